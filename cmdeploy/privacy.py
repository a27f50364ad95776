"""The one scrubber for text on its way to the terminal: exception messages and log records.

cmdeploy's own messages never contain patient names, IDs or DICOM UIDs, but libraries' messages
do: pydicom echoes malformed header values ("Unable to convert '03/14/1961' to 'DA' object"),
highdicom logs the UIDs of the instances it copies from and creates, a ``KeyError`` shows a private
SOP Class UID. Everything a command prints about an error, and every log record and warning,
passes through :func:`scrub` first:

* values registered with :func:`register_identifiers` (the DICOM reader registers the patient and
  study attributes and the UIDs of every header it reads) are replaced by ``<redacted>`` wherever
  they stand as whole words (case-insensitive: "DOE" in "Doe^Jane", not in "does");
* anything shaped like a DICOM UID (4 or more dot-separated numbers, or a long last component such
  as ``2.25.<uuid>``) is replaced by ``<uid>``;
* for library text (``library=True``), quoted values are replaced by ``'...'``, since they are
  the library echoing its input.

:func:`install_log_scrubber` routes the ``logging`` and ``warnings`` output of the process through
one stderr handler with a :class:`ScrubFilter`, and keeps highdicom's INFO records (which carry
UIDs) off.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import Iterable

REDACTED = "<redacted>"
_UID = re.compile(r"(?<![\w.])[0-9]+(?:\.[0-9]+){3,}(?![\w])|(?<![\w.])[0-9]+\.[0-9]+\.[0-9]{8,}(?![\w])")
_QUOTED = re.compile(r"'[^'\n]*'|\"[^\"\n]*\"")
_MIN_LEN = 3  # shorter values ("M", "F", "12") would redact ordinary words and numbers
_MAX_IDENTIFIERS = 50_000
_lock = threading.Lock()
_identifiers: set[str] = set()
_pattern: re.Pattern[str] | None = None


def register_identifiers(values: Iterable[object]) -> None:
    """Remember identifying values (names, IDs, dates, UIDs) so :func:`scrub` redacts them.

    Person names are registered whole and by component (``DOE^JANE`` -> ``DOE``, ``JANE``, the
    whole with ``^`` and with spaces). Values shorter than 3 characters are ignored.
    """
    global _pattern
    new: set[str] = set()
    for v in values:
        text = str(v if v is not None else "").strip()
        if not text:
            continue
        parts = {text, text.replace("^", " ").strip(), *re.split(r"[\^=\\]", text)}
        new.update(p.strip() for p in parts if len(p.strip()) >= _MIN_LEN)
    with _lock:
        if len(_identifiers) + len(new) > _MAX_IDENTIFIERS:
            return
        before = len(_identifiers)
        _identifiers.update(new)
        if len(_identifiers) != before:
            _pattern = None


def _identifier_pattern() -> re.Pattern[str] | None:
    global _pattern
    with _lock:
        if _pattern is None and _identifiers:
            alts = sorted(_identifiers, key=len, reverse=True)
            body = "|".join(re.escape(a) for a in alts)
            # whole words only; "_", "-", "." and "/" separate words (folder names like DOE_JANE)
            _pattern = re.compile(rf"(?<![^\W_])(?:{body})(?![^\W_])", re.IGNORECASE)
        return _pattern


def scrub(text: object, *, library: bool = False) -> str:
    """``text`` with registered identifiers, UID-shaped numbers and (``library``) quoted values
    replaced (see the module docstring)."""
    out = str(text)
    pattern = _identifier_pattern()
    if pattern is not None:
        out = pattern.sub(REDACTED, out)
    out = _UID.sub("<uid>", out)
    if library:
        out = _QUOTED.sub("'...'", out)
    return out


def describe_exception(exc: BaseException) -> str:
    """``<type>: <message>`` of a library exception, scrubbed (quoted values dropped), one line."""
    message = str(exc).splitlines()[0] if str(exc) else ""
    text = scrub(message, library=True)[:300]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class ScrubFilter(logging.Filter):
    """Rewrites each record's message through :func:`scrub` (library text: quoted values too)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: keep only its template
            message = str(record.msg)
        record.msg = scrub(message, library=True)
        record.args = ()
        if record.exc_info:
            record.exc_text = None
            record.exc_info = None  # tracebacks carry locals' reprs; CMDEPLOY_DEBUG shows them
        return True


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (test runners swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:  # noqa: ANN001
        pass


_MARK = "_cmdeploy_scrubber"


def install_log_scrubber(level: int = logging.WARNING) -> None:
    """Route log records and Python warnings through one scrubbed stderr handler (idempotent).

    Records from libraries below ``level`` are dropped; highdicom's INFO records (UIDs of copied
    and created instances) are never emitted.
    """
    root = logging.getLogger()
    if not any(getattr(h, _MARK, False) for h in root.handlers):
        handler = _StderrHandler()
        handler.setLevel(level)
        handler.addFilter(ScrubFilter())
        handler.setFormatter(logging.Formatter("%(levelname)s: %(name)s: %(message)s"))
        setattr(handler, _MARK, True)
        root.addHandler(handler)
        if root.level == logging.NOTSET or root.level < level:
            root.setLevel(level)
    for name in ("highdicom", "pydicom"):
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    logging.captureWarnings(True)


__all__ = [
    "REDACTED",
    "ScrubFilter",
    "describe_exception",
    "install_log_scrubber",
    "register_identifiers",
    "scrub",
]
