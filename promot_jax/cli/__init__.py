"""The `promot` command (argparse) on top of every other layer; `main` is the entry point."""

from promot_jax.cli.app import main

__all__ = ['main']
