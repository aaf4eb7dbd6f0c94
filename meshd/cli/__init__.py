"""The ``meshd`` command line: the entry point (``main``) and one module per subcommand."""
