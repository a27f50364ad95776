"""PACS round trip: fetch a CT series from a PACS, segment it, store the DICOM SEG back.

Sources and destinations are written ``dicomweb:URL`` (QIDO-RS/WADO-RS/STOW-RS through
dicomweb-client) or ``dimse:AET@HOST:PORT`` (C-FIND/C-GET/C-STORE through pynetdicom); both need
``pip install 'cmdeploy[pacs]'``. For a hospital script::

    from cmdeploy import Segmenter
    from cmdeploy.pacs import PacsError, connect, segment_series

    pacs = connect("dimse:ORTHANC@pacs:4242", calling_aet="CMDEPLOY", timeout=30, retries=3)
    try:
        result = segment_series(pacs, study_uid, series_uid, "points.csv",
                                segmenter=Segmenter.load(), send_to=pacs)
    except PacsError as exc:              # exc.exit_code, exc.transient; str(exc) has no patient data
        ...

The names below are imported on first use (PEP 562): ``import cmdeploy.pacs`` loads neither
dicomweb-client nor pynetdicom.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "connect": "cmdeploy.pacs.api",
    "check": "cmdeploy.pacs.api",
    "fetch_series": "cmdeploy.pacs.api",
    "retrieved_series": "cmdeploy.pacs.api",
    "segment_series": "cmdeploy.pacs.api",
    "send": "cmdeploy.pacs.api",
    "PacsSegmentation": "cmdeploy.pacs.api",
    "PacsOptions": "cmdeploy.pacs.endpoints",
    "DicomWebEndpoint": "cmdeploy.pacs.endpoints",
    "DimseEndpoint": "cmdeploy.pacs.endpoints",
    "parse_endpoint": "cmdeploy.pacs.endpoints",
    "PacsError": "cmdeploy.pacs.errors",
    "PacsUnreachable": "cmdeploy.pacs.errors",
    "PacsTimeout": "cmdeploy.pacs.errors",
    "PacsNotFound": "cmdeploy.pacs.errors",
    "PacsRefused": "cmdeploy.pacs.errors",
    "PacsStoreRejected": "cmdeploy.pacs.errors",
    "PacsProtocolError": "cmdeploy.pacs.errors",
    "DicomWebPacs": "cmdeploy.pacs.dicomweb",
    "DimsePacs": "cmdeploy.pacs.dimse",
}

__all__ = [
    "DicomWebEndpoint",
    "DicomWebPacs",
    "DimseEndpoint",
    "DimsePacs",
    "PacsError",
    "PacsNotFound",
    "PacsOptions",
    "PacsProtocolError",
    "PacsRefused",
    "PacsSegmentation",
    "PacsStoreRejected",
    "PacsTimeout",
    "PacsUnreachable",
    "check",
    "connect",
    "fetch_series",
    "parse_endpoint",
    "retrieved_series",
    "segment_series",
    "send",
]

if TYPE_CHECKING:
    from cmdeploy.pacs.api import (
        PacsSegmentation,
        check,
        connect,
        fetch_series,
        retrieved_series,
        segment_series,
        send,
    )
    from cmdeploy.pacs.dicomweb import DicomWebPacs
    from cmdeploy.pacs.dimse import DimsePacs
    from cmdeploy.pacs.endpoints import DicomWebEndpoint, DimseEndpoint, PacsOptions, parse_endpoint
    from cmdeploy.pacs.errors import (
        PacsError,
        PacsNotFound,
        PacsProtocolError,
        PacsRefused,
        PacsStoreRejected,
        PacsTimeout,
        PacsUnreachable,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cmdeploy.pacs' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
