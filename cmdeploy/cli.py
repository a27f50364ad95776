"""The ``cmdeploy`` command line (Typer).

Each sub-command lives in ``cmdeploy/commands/<name>.py`` and imports its heavy dependencies
(torch, onnx, highdicom, ...) inside the function body, so ``cmdeploy --help`` stays fast and
``cmdeploy infer`` never imports torch.
"""

from __future__ import annotations

import importlib

import typer

from cmdeploy import __version__

app = typer.Typer(
    name="cmdeploy",
    help="Class-agnostic CT segmentation from four extreme points: train, export, calibrate, infer.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# (command name, module under cmdeploy.commands, function name)
_COMMANDS: list[tuple[str, str, str]] = [
    ("guidance", "guidance", "guidance"),
    ("train", "train", "train"),
    ("export", "export", "export"),
    ("verify", "verify", "verify"),
    ("calibrate", "calibrate", "calibrate"),
    ("infer", "infer", "infer"),
    ("points-from-labels", "points_from_labels", "points_from_labels"),
    ("generate-labels", "generate_labels", "generate_labels"),
    ("evaluate", "evaluate", "evaluate"),
    ("bench", "bench", "bench"),
    ("serve", "serve", "serve"),
    ("triton", "triton", "triton"),
]


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"cmdeploy {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version."
    ),
) -> None:
    """cmdeploy: extreme-point confidence-map segmentation, from training to deployment."""
    from cmdeploy.commands._common import install_signal_handlers
    from cmdeploy.privacy import install_log_scrubber

    install_signal_handlers()
    install_log_scrubber()


def _register() -> None:
    for name, module_name, func_name in _COMMANDS:
        module = importlib.import_module(f"cmdeploy.commands.{module_name}")
        app.command(name)(getattr(module, func_name))


_register()
