"""Typer sub-commands, one module each; heavy imports live inside the command functions."""
