"""Subcommands of ``ssm2d-path``: each module has ``register(subparsers)``."""
