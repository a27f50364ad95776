"""Plumbing shared by the CLI commands: consoles, errors -> exit statuses, JSON of results.

Exit statuses: 1 = a check failed (parity, accuracy gate), 2 = a bad input or option
(:class:`~cmdeploy.errors.InputError`), 3 = a model or runtime failure, 130 = interrupted (SIGINT
or SIGTERM; staged outputs and temp files are removed first, as ``infer`` does). Every message goes
through :func:`cmdeploy.privacy.scrub` (no patient identifiers or UIDs on the terminal). Every
command runs its body in :func:`guarded`, so none ends in a traceback. rich loads inside the
functions, so command modules may import this one at their top without slowing ``cmdeploy --help``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, NoReturn

import typer

from cmdeploy.errors import InputError, ModelError

if TYPE_CHECKING:
    from rich.console import Console

EXIT_CHECK = 1
EXIT_INPUT = 2
EXIT_MODEL = 3
EXIT_INTERRUPTED = 130
# what a command reports as "model/runtime error" (exit 3) by default
MODEL_ERRORS: tuple[type[BaseException], ...] = (ModelError, RuntimeError, MemoryError, OSError)


def require(module: str, extra: str, what: str) -> None:
    """Exit 2 with ``<what> needs <module>: pip install 'cmdeploy[<extra>]'`` when ``module`` is not
    installed; checked without importing it (the runtime package never imports torch itself)."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        fail(f"{what} needs {module}: pip install 'cmdeploy[{extra}]'")


def check_runtime_options(backends: str | list[str], device: str) -> None:
    """InputError unless every ``--backend`` is one of the Segmenter's and ``--device`` is cpu/cuda."""
    from cmdeploy.segmenter import BACKENDS

    for b in [backends] if isinstance(backends, str) else backends:
        if b not in BACKENDS:
            raise InputError(f"--backend must be one of {', '.join(BACKENDS)}, got {b!r}")
    if device not in ("cpu", "cuda"):
        raise InputError(f"--device must be cpu or cuda, got {device!r}")


def fail(message: str, code: int = EXIT_INPUT) -> NoReturn:
    """Print ``error: <message>`` on stderr (plain text, scrubbed) and exit with ``code``."""
    from cmdeploy.privacy import scrub

    typer.echo(f"error: {scrub(message)}", err=True)
    raise typer.Exit(code)


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def install_signal_handlers() -> None:
    """Treat SIGTERM like SIGINT (``KeyboardInterrupt``: staged outputs are discarded, temp files
    removed) when its handler is still the default; main thread only."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM"):
        return
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)


def error_console() -> Console:
    """The stderr console a command logs progress and errors on (no syntax highlighting)."""
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def wide_console() -> Console:
    """A stdout console; 160 columns when not a terminal (pipes, logs) so tables do not wrap."""
    from rich.console import Console

    probe = Console()
    return Console(highlight=False, width=None if probe.is_terminal else max(probe.width, 160))


@contextmanager
def exit_on_error(
    err: Console, *, model_errors: tuple[type[BaseException], ...] = MODEL_ERRORS
) -> Iterator[None]:
    """Run the block; on :class:`InputError` print ``error: ...`` and exit 2, on one of
    ``model_errors`` print ``model/runtime error: ...`` and exit 3 (messages on ``err``, one
    unwrapped line each, markup escaped)."""
    from rich.markup import escape

    from cmdeploy.privacy import scrub

    try:
        yield
    except (typer.Exit, typer.Abort):  # click's Exit is a RuntimeError: never a model error
        raise
    except InputError as exc:
        err.print(f"[red]error:[/red] {escape(scrub(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_INPUT) from None
    except model_errors as exc:
        err.print(
            f"[red]model/runtime error:[/red] {escape(_runtime_message(exc))}", highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(EXIT_MODEL) from None


def _runtime_message(exc: BaseException) -> str:
    """The message of a model/runtime error: cmdeploy's own (ModelError) scrubbed of identifiers,
    an OS error as ``<reason>: '<file>'``, anything else as a scrubbed library message (quoted
    values dropped), one line."""
    from cmdeploy.privacy import scrub

    if isinstance(exc, ModelError):
        return scrub(exc)
    if isinstance(exc, OSError) and exc.strerror:
        where = f": '{exc.filename}'" if exc.filename else ""
        return scrub(f"{exc.strerror}{where}")
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return scrub(text, library=True)


@contextmanager
def no_traceback(err: Console) -> Iterator[None]:
    """Turn any other exception into ``internal error: <type>: <message>`` and exit 3, so a
    hospital script sees a one-line reason and a status instead of a traceback; set
    ``CMDEPLOY_DEBUG=1`` to get the traceback."""
    import os

    from rich.markup import escape

    from cmdeploy.privacy import describe_exception

    try:
        yield
    except (typer.Exit, typer.Abort, KeyboardInterrupt):
        raise
    except Exception as exc:
        if os.environ.get("CMDEPLOY_DEBUG"):
            raise
        err.print(
            f"[red]internal error:[/red] {escape(describe_exception(exc))} "
            "(CMDEPLOY_DEBUG=1 shows the traceback)", highlight=False, soft_wrap=True,
        )
        raise typer.Exit(EXIT_MODEL) from None


@contextmanager
def guarded(
    err: Console, *, model_errors: tuple[type[BaseException], ...] = MODEL_ERRORS
) -> Iterator[None]:
    """:func:`no_traceback` around :func:`exit_on_error`: the error plumbing of every command.

    InputError -> exit 2, ``model_errors`` -> exit 3, any other exception -> one scrubbed line and
    exit 3, Ctrl-C or SIGTERM -> ``interrupted`` and exit 130; ``typer.Exit`` (e.g. from
    :func:`fail`) passes through.
    """
    try:
        with no_traceback(err), exit_on_error(err, model_errors=model_errors):
            yield
    except KeyboardInterrupt:
        err.print("[red]interrupted[/red]", highlight=False)
        raise typer.Exit(EXIT_INTERRUPTED) from None


__all__ = [
    "EXIT_CHECK",
    "EXIT_INPUT",
    "EXIT_INTERRUPTED",
    "EXIT_MODEL",
    "MODEL_ERRORS",
    "error_console",
    "exit_on_error",
    "fail",
    "guarded",
    "install_signal_handlers",
    "no_traceback",
    "require",
    "wide_console",
]
