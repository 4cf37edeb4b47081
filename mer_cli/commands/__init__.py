"""Thin click wrappers, one module per subcommand; each exposes ``command``."""
