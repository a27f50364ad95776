"""PACS addresses as the CLI writes them, and the connection options shared by every operation.

* ``dicomweb:URL`` - a DICOMweb service root (``http(s)://host[:port]/path``, e.g. Orthanc's
  ``http://pacs:8042/dicom-web``): QIDO-RS to find, WADO-RS to fetch, STOW-RS to store.
* ``dimse:AET@HOST:PORT`` - a DICOM node (called AE title, host name or IP, TCP port; IPv6 hosts in
  brackets): C-FIND + C-GET to fetch, C-ECHO to check, C-STORE to store.

Parsing never touches the network; a malformed address is an :class:`~cmdeploy.errors.InputError`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from cmdeploy.errors import InputError

DICOMWEB_PREFIX = "dicomweb:"
DIMSE_PREFIX = "dimse:"
DEFAULT_CALLING_AET = "CMDEPLOY"
_AET = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")  # DICOM AE: 16 printable chars, no backslash


def check_aet(aet: str, what: str = "AE title") -> str:
    """An AE title: 1-16 printable ASCII characters, no backslash, not only spaces."""
    if not _AET.fullmatch(aet or "") or not aet.strip():
        raise InputError(f"{what} {aet!r} is not a valid DICOM AE title (1-16 printable characters)")
    return aet.strip()


@dataclass(frozen=True)
class DicomWebEndpoint:
    """A DICOMweb service root URL (no trailing slash)."""

    url: str

    @property
    def display(self) -> str:
        """``DICOMweb http://host:port/path`` without user name or password."""
        p = urlsplit(self.url)
        host = p.hostname or "?"
        if ":" in host:
            host = f"[{host}]"
        port = f":{p.port}" if p.port else ""
        return f"DICOMweb {p.scheme}://{host}{port}{p.path}"


@dataclass(frozen=True)
class DimseEndpoint:
    """A DICOM node: called AE title, host, port."""

    aet: str
    host: str
    port: int

    @property
    def display(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"DIMSE {self.aet}@{host}:{self.port}"


Endpoint = DicomWebEndpoint | DimseEndpoint


def is_pacs_address(text: str) -> bool:
    """True when ``text`` names a PACS (``dicomweb:...`` or ``dimse:...``) rather than a path."""
    return str(text).lower().startswith((DICOMWEB_PREFIX, DIMSE_PREFIX))


def parse_endpoint(text: str, *, option: str = "PACS address") -> Endpoint:
    """``dicomweb:URL`` or ``dimse:AET@HOST:PORT`` -> endpoint; :class:`InputError` otherwise."""
    raw = str(text).strip()
    low = raw.lower()
    if low.startswith(DICOMWEB_PREFIX):
        url = raw[len(DICOMWEB_PREFIX):].rstrip("/")
        try:
            p = urlsplit(url)
            _ = p.port  # raises ValueError on a bad port
        except ValueError:
            raise InputError(f"{option}: malformed DICOMweb URL") from None
        if p.scheme not in ("http", "https") or not p.hostname:
            raise InputError(
                f"{option}: expected dicomweb:http(s)://host[:port]/path (e.g. "
                "dicomweb:http://pacs:8042/dicom-web)"
            )
        return DicomWebEndpoint(url)
    if low.startswith(DIMSE_PREFIX):
        rest = raw[len(DIMSE_PREFIX):]
        aet, at, hostport = rest.rpartition("@")
        host, colon, port_text = hostport.rpartition(":")
        if not at or not colon or not host:
            raise InputError(f"{option}: expected dimse:AET@HOST:PORT (e.g. dimse:ORTHANC@pacs:4242)")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise InputError(f"{option}: port must be a number in 1..65535")
        return DimseEndpoint(check_aet(aet, f"{option}: called AE title"), host, int(port_text))
    raise InputError(f"{option}: expected dicomweb:URL or dimse:AET@HOST:PORT")


@dataclass(frozen=True)
class PacsOptions:
    """How to talk to a PACS.

    Attributes:
        calling_aet: our AE title for DIMSE (the PACS must know it to allow C-GET).
        timeout: seconds to wait for a connection and for each answer (HTTP read, ACSE, DIMSE).
        retries: extra attempts after a transient failure (refused/dropped connection, timeout,
            HTTP 429/502/503/504); 0 = try once.
        backoff: seconds before the first retry, doubled before each further one.
    """

    calling_aet: str = DEFAULT_CALLING_AET
    timeout: float = 30.0
    retries: int = 2
    backoff: float = 1.0

    def __post_init__(self) -> None:
        check_aet(self.calling_aet, "calling AE title")
        if not self.timeout > 0:
            raise InputError(f"PACS timeout must be > 0 seconds, got {self.timeout}")
        if self.retries < 0:
            raise InputError(f"PACS retries must be >= 0, got {self.retries}")
        if self.backoff < 0:
            raise InputError(f"PACS back-off must be >= 0 seconds, got {self.backoff}")


__all__ = [
    "DEFAULT_CALLING_AET",
    "DicomWebEndpoint",
    "DimseEndpoint",
    "Endpoint",
    "PacsOptions",
    "check_aet",
    "is_pacs_address",
    "parse_endpoint",
]
