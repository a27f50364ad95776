"""The PACS part of ``cmdeploy infer``: resolve ``--input dicomweb:/dimse:`` into a temporary folder
before the normal run, and ``--send`` the written SEG afterwards.

Order of work (nothing is retrieved or computed before the cheap checks pass):

1. options are parsed and checked (exit 2): addresses, ``--study``/``--series``, ``--send`` needs
   the ``dicom-seg`` format, the points CSV exists, ``report.json``/``seg.dcm`` do not (unless
   ``--overwrite``);
2. the ``--send`` destination is checked (QIDO-RS query / C-ECHO), so a PACS that is down or does
   not accept our AE titles fails before the work (exit 4/5/7);
3. the series is retrieved into a ``cmdeploy-pacs-*`` temporary folder (removed at the end, also
   on errors, Ctrl-C and SIGTERM), then the normal ``infer`` run reads it as a DICOM folder;
4. after the outputs are committed, the SEG just written is sent. If the PACS rejects it the
   outputs stay complete on disk (``seg.dcm`` can be resent) and the exit status says so.

PACS failures exit with the codes of :mod:`cmdeploy.pacs.errors` (4-9); Ctrl-C exits 130.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from cmdeploy.errors import InputError
from cmdeploy.pacs.endpoints import Endpoint, PacsOptions, is_pacs_address, parse_endpoint
from cmdeploy.pacs.errors import PacsError

if TYPE_CHECKING:
    from rich.console import Console

EXIT_INTERRUPTED = 130


@contextmanager
def pacs_exit_codes(err: Console) -> Iterator[None]:
    """Print ``PACS error: ...`` and exit with the error's code; Ctrl-C prints ``interrupted`` and
    exits 130 (temporary folders are removed by the blocks being unwound)."""
    from rich.markup import escape

    try:
        yield
    except PacsError as exc:
        err.print(f"[red]PACS error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err.print("[red]interrupted[/red]", highlight=False)
        raise typer.Exit(EXIT_INTERRUPTED) from None


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """While the block runs (main thread only), SIGTERM raises KeyboardInterrupt, so temporary
    folders are removed when a hospital scheduler stops the run."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@dataclass
class PacsRun:
    """What ``infer`` needs from the PACS step: where to read the series and how to send results."""

    input_path: Path
    series_uid: str | None
    destination: Endpoint | None = None
    options: PacsOptions = field(default_factory=PacsOptions)
    err: Any = None

    def send(self, written: Sequence[Path], seg_name: str) -> None:
        """Send the SEG among the ``written`` outputs to the destination (if one was given)."""
        if self.destination is None:
            return
        segs = [p for p in written if p.name == seg_name]
        if not segs:
            self.err.print("[yellow]warning:[/yellow] no DICOM SEG was written: nothing sent to the PACS")
            return
        from cmdeploy.pacs.api import connect, send

        pacs = connect(self.destination, self.options)
        t0 = time.perf_counter()
        send(pacs, segs, on_retry=self._on_retry)
        self.err.print(f"pacs: stored the SEG on {pacs.display} in {time.perf_counter() - t0:.2f} s")

    def _on_retry(self, exc: PacsError, attempt: int, delay: float) -> None:
        from rich.markup import escape

        self.err.print(
            f"[yellow]pacs:[/yellow] {escape(str(exc))}; retry {attempt} of {self.options.retries} "
            f"in {delay:g} s",
            highlight=False, soft_wrap=True,
        )


def _precheck(points: Path, output: Path, overwrite: bool, formats: str | None, send: bool) -> None:
    """The checks that must pass before anything is retrieved (the full ones run again later)."""
    from cmdeploy.commands.infer import REPORT_NAME, SEG_NAME, parse_formats
    from cmdeploy.writers.atomic import OutputDir

    if not points.is_file():
        raise InputError(f"points CSV '{points}' does not exist or is not a file")
    chosen = parse_formats(formats, "dicom-series")
    if send and "dicom-seg" not in chosen:
        raise InputError("--send stores the DICOM SEG: include dicom-seg in --format (and install highdicom)")
    OutputDir(output, overwrite=overwrite).check([REPORT_NAME] + ([SEG_NAME] if send else []))


@contextmanager
def pacs_run(
    input_text: str,
    *,
    study: str | None,
    series: str | None,
    series_uid: str | None,
    send: str | None,
    calling_aet: str,
    timeout: float,
    retries: int,
    points: Path,
    output: Path,
    overwrite: bool,
    formats: str | None,
    err: Console,
) -> Iterator[PacsRun]:
    """Resolve the input (a path, or a PACS series fetched into a temporary folder) and yield a
    :class:`PacsRun`; without PACS options this is a pass-through for the local path."""
    remote = is_pacs_address(input_text)
    if not remote and send is None:
        if study is not None:
            raise InputError("--study applies to a PACS --input (dicomweb:URL or dimse:AET@HOST:PORT)")
        yield PacsRun(Path(input_text), series_uid or series)
        return

    options = PacsOptions(calling_aet=calling_aet, timeout=timeout, retries=retries)
    source = parse_endpoint(input_text, option="--input") if remote else None
    destination = parse_endpoint(send, option="--send") if send is not None else None
    if remote:
        if not study or not series:
            raise InputError("a PACS --input needs --study UID and --series UID")
        if series_uid is not None and series_uid != series:
            raise InputError("--series-uid differs from --series; give --series only")
    elif study is not None:
        raise InputError("--study applies to a PACS --input (dicomweb:URL or dimse:AET@HOST:PORT)")
    elif input_text.lower().endswith((".nii", ".nii.gz", ".png", ".npy")):
        raise InputError("--send stores a DICOM SEG, which needs a DICOM input (a folder or a DICOM file)")
    _precheck(points, output, overwrite, formats, destination is not None)

    from cmdeploy.pacs.api import check, connect, retrieved_series

    run = PacsRun(Path(input_text), series_uid or series, destination, options, err)
    with _sigterm_as_interrupt():
        if destination is not None:
            check(connect(destination, options), on_retry=run._on_retry)
        if source is None:
            yield run
            return
        pacs = connect(source, options)
        t0 = time.perf_counter()
        with retrieved_series(pacs, study, series, on_retry=run._on_retry) as folder:  # type: ignore[arg-type]
            n = sum(1 for _ in folder.iterdir())
            took = time.perf_counter() - t0
            err.print(f"pacs: retrieved {n} instance(s) from {pacs.display} in {took:.2f} s")
            run.input_path = folder
            yield run


__all__ = ["EXIT_INTERRUPTED", "PacsRun", "pacs_exit_codes", "pacs_run"]
