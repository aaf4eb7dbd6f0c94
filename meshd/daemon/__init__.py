"""The per-host daemon: its lifetime tree, configuration reload and the probes of local apps."""
