"""PACS failures: one exception type per cause, each with the ``cmdeploy infer`` exit status.

Messages name the PACS (host and port, never credentials), the operation and the status code the
PACS answered (HTTP status, DIMSE status, association result/source/reason); they never contain
patient names, IDs or DICOM UIDs. ``transient`` failures (connection refused or dropped, timeouts,
HTTP 429/502/503/504, transient association rejections) are retried with back-off by
:func:`cmdeploy.pacs.retry.with_retries`.

=====  ===========================  ==========================================================
exit   exception                    meaning
=====  ===========================  ==========================================================
4      :class:`PacsUnreachable`     cannot connect (refused, unknown host) or connection lost
5      :class:`PacsTimeout`         the PACS accepted the connection but did not answer in time
6      :class:`PacsNotFound`        the study/series is not on the PACS (or has no instances)
7      :class:`PacsRefused`         association rejected (AE titles) or HTTP 401/403 on a query
8      :class:`PacsStoreRejected`   the PACS refused to store the SEG (STOW-RS or C-STORE)
9      :class:`PacsProtocolError`   any other unexpected answer (HTTP 5xx, C-GET failure, ...)
=====  ===========================  ==========================================================
"""

from __future__ import annotations

EXIT_UNREACHABLE = 4
EXIT_TIMEOUT = 5
EXIT_NOT_FOUND = 6
EXIT_REFUSED = 7
EXIT_STORE_REJECTED = 8
EXIT_PROTOCOL = 9


class PacsError(Exception):
    """A PACS operation failed; ``exit_code`` is the CLI status, ``transient`` says whether a retry
    may help. Not a ``RuntimeError``/``OSError`` on purpose: the CLI maps those to exit 3."""

    exit_code = EXIT_PROTOCOL
    transient = False

    def __init__(self, message: str, *, transient: bool | None = None) -> None:
        super().__init__(message)
        if transient is not None:
            self.transient = transient


class PacsUnreachable(PacsError):
    """No connection: refused, unknown host, network down, or the connection dropped."""

    exit_code = EXIT_UNREACHABLE
    transient = True


class PacsTimeout(PacsError):
    """Connected, but the PACS did not answer within the timeout."""

    exit_code = EXIT_TIMEOUT
    transient = True


class PacsNotFound(PacsError):
    """The requested study/series does not exist on the PACS (or holds no instances)."""

    exit_code = EXIT_NOT_FOUND


class PacsRefused(PacsError):
    """The PACS refused us: association rejected (wrong called/calling AE title, not allowed) or
    HTTP 401/403 on a query or retrieval."""

    exit_code = EXIT_REFUSED


class PacsStoreRejected(PacsError):
    """The PACS refused to store the SEG: HTTP error or FailedSOPSequence on STOW-RS, a C-STORE
    failure status, no accepted presentation context, or an abort on the C-STORE request."""

    exit_code = EXIT_STORE_REJECTED


class PacsProtocolError(PacsError):
    """Any other unexpected answer: HTTP 5xx, malformed response, C-GET/C-FIND failure status,
    fewer instances retrieved than the PACS listed."""

    exit_code = EXIT_PROTOCOL


EXIT_CODES: dict[int, str] = {
    EXIT_UNREACHABLE: "PACS unreachable (connection refused, unknown host, connection lost)",
    EXIT_TIMEOUT: "PACS timed out",
    EXIT_NOT_FOUND: "study/series not found on the PACS",
    EXIT_REFUSED: "PACS refused the association or the request (AE title, HTTP 401/403)",
    EXIT_STORE_REJECTED: "PACS rejected the SEG",
    EXIT_PROTOCOL: "unexpected PACS answer",
}

__all__ = [
    "EXIT_CODES",
    "EXIT_NOT_FOUND",
    "EXIT_PROTOCOL",
    "EXIT_REFUSED",
    "EXIT_STORE_REJECTED",
    "EXIT_TIMEOUT",
    "EXIT_UNREACHABLE",
    "PacsError",
    "PacsNotFound",
    "PacsProtocolError",
    "PacsRefused",
    "PacsStoreRejected",
    "PacsTimeout",
    "PacsUnreachable",
]
