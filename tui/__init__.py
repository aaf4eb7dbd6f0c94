"""The meshd operator console (``meshd tui``): a Textual app reading every meshd's admin API,
found through the registry, and editing traffic splits in the registry's KV with check-and-set."""
