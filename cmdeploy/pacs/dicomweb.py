"""DICOMweb with dicomweb-client: QIDO-RS to find a series, WADO-RS to fetch it, STOW-RS to store.

WADO-RS asks for ``multipart/related; type="application/dicom"; transfer-syntax=*``: every instance
comes as stored, so a PACS without a transcoder (Orthanc without its GDCM plugin cannot transcode
JPEG 2000) still delivers compressed series; pydicom decodes them (``cmdeploy[dicom]``).

dicomweb-client's own retrying is switched off: :func:`cmdeploy.pacs.retry.with_retries` retries
whole operations. HTTP errors become :mod:`cmdeploy.pacs.errors` types naming the HTTP status; the
request URL (which holds UIDs) is never put in a message.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cmdeploy.errors import InputError
from cmdeploy.pacs.endpoints import DicomWebEndpoint, PacsOptions
from cmdeploy.pacs.errors import (
    PacsError,
    PacsNotFound,
    PacsProtocolError,
    PacsRefused,
    PacsStoreRejected,
    PacsTimeout,
    PacsUnreachable,
)

PACS_EXTRA_HINT = "pip install 'cmdeploy[pacs]'"
ANY_TRANSFER_SYNTAX = (("application/dicom", "*"),)
_BUSY = (429, 502, 503)
_TIMEOUT_STATUS = (408, 504)


def _client_class() -> Any:
    try:
        from dicomweb_client.api import DICOMwebClient
    except ImportError:
        raise InputError(f"DICOMweb needs dicomweb-client: {PACS_EXTRA_HINT}") from None
    return DICOMwebClient


def http_error(status: int, reason: str, what: str, *, store: bool = False) -> PacsError:
    """The :class:`PacsError` for an HTTP error ``status`` answered to operation ``what``."""
    text = f"{what}: HTTP {status}{' ' + reason if reason else ''}"
    if status in _TIMEOUT_STATUS:
        return PacsTimeout(text)
    if status in _BUSY:
        return PacsProtocolError(f"{text} (PACS busy or unavailable)", transient=True)
    if store:
        return PacsStoreRejected(text)
    if status in (401, 403):
        return PacsRefused(f"{text} (credentials or permissions)")
    if status == 404:
        return PacsNotFound(f"{text} (the requested series is not on the PACS)")
    return PacsProtocolError(text)


class DicomWebPacs:
    """A DICOMweb service.

        >>> pacs = DicomWebPacs(DicomWebEndpoint("http://pacs:8042/dicom-web"), PacsOptions(timeout=30))
        >>> pacs.check()                                           # QIDO-RS, limit 1
        >>> paths = pacs.fetch_series(study_uid, series_uid, folder)   # QIDO-RS + WADO-RS
        >>> pacs.store([seg_dataset])                              # STOW-RS

    ``session`` (a ``requests.Session``, e.g. with authentication) and ``headers`` (e.g. an
    ``Authorization`` header) are passed to dicomweb-client.
    """

    def __init__(
        self,
        endpoint: DicomWebEndpoint,
        options: PacsOptions | None = None,
        *,
        session: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.options = options or PacsOptions()
        t = float(self.options.timeout)
        client = _client_class()(endpoint.url, session=session, headers=headers, timeout=(t, t))
        client.set_http_retry_params(retry=False)
        self.client = client

    @property
    def display(self) -> str:
        return self.endpoint.display

    @contextmanager
    def _errors(self, operation: str, *, store: bool = False) -> Iterator[None]:
        """Translate requests/dicomweb-client exceptions into :class:`PacsError` types."""
        import requests

        what = f"{self.display} {operation}"
        try:
            yield
        except PacsError:
            raise
        except requests.exceptions.HTTPError as exc:
            resp = exc.response
            status = resp.status_code if resp is not None else 0
            raise http_error(status, resp.reason if resp is not None else "", what, store=store) from None
        except requests.exceptions.Timeout:
            raise PacsTimeout(f"{what}: no answer within {self.options.timeout:g} s") from None
        except requests.exceptions.ConnectionError as exc:
            text = repr(exc)
            if "NameResolution" in text or "Name or service not known" in text:
                reason = "unknown host"
            elif "Connection refused" in text or "ConnectionRefused" in text:
                reason = "connection refused (is the PACS running, is the port right?)"
            else:
                reason = "connection failed or dropped"
            raise PacsUnreachable(f"{what}: {reason}") from None
        except requests.exceptions.RequestException as exc:
            raise PacsProtocolError(f"{what}: {type(exc).__name__}") from None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PacsProtocolError(f"{what}: unexpected answer ({type(exc).__name__})") from None

    def check(self) -> None:
        """One QIDO-RS study query (limit 1): the service is up and answers us."""
        with self._errors("QIDO-RS check"):
            try:
                self.client.search_for_studies(limit=1)
            except Exception as exc:  # a 404 here means "no DICOMweb service at this URL"
                import requests

                if isinstance(exc, requests.exceptions.HTTPError) and exc.response is not None:
                    if exc.response.status_code == 404:
                        raise PacsProtocolError(
                            f"{self.display}: HTTP 404 Not Found for a QIDO-RS query; is the URL the "
                            "DICOMweb root (e.g. http://pacs:8042/dicom-web)?"
                        ) from None
                raise

    def count_instances(self, study_uid: str, series_uid: str) -> int:
        """Instances QIDO-RS lists for the series; :class:`PacsNotFound` when none."""
        with self._errors("QIDO-RS search"):
            found = self.client.search_for_instances(
                study_instance_uid=study_uid, series_instance_uid=series_uid,
                fields=["SOPInstanceUID"],
            )
        if not found:
            raise PacsNotFound(
                f"{self.display}: the requested series is not on the PACS (QIDO-RS found no instance)"
            )
        return len(found)

    def locate_instance(self, sop_instance_uid: str) -> tuple[str, str]:
        """(StudyInstanceUID, SeriesInstanceUID) of an instance, by a QIDO-RS instance query;
        :class:`PacsNotFound` when the PACS does not hold it."""
        with self._errors("QIDO-RS instance search"):
            found = self.client.search_for_instances(
                search_filters={"SOPInstanceUID": sop_instance_uid},
                fields=["StudyInstanceUID", "SeriesInstanceUID"],
            )
        try:
            item = found[0]
            return str(item["0020000D"]["Value"][0]), str(item["0020000E"]["Value"][0])
        except (IndexError, KeyError, TypeError):
            raise PacsNotFound(f"{self.display}: the requested instance is not on the PACS") from None

    def fetch_series(
        self,
        study_uid: str,
        series_uid: str,
        folder: str | Path,
        progress: Callable[[int, int | None], None] | None = None,
    ) -> list[Path]:
        """QIDO-RS the series, then WADO-RS every instance (any transfer syntax) into ``folder``
        (``000000.dcm``, ... in the order received). ``progress(received, expected)`` after each."""
        import pydicom

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        expected = self.count_instances(study_uid, series_uid)
        paths: list[Path] = []
        with self._errors("WADO-RS retrieve"):
            for ds in self.client.iter_series(study_uid, series_uid, media_types=ANY_TRANSFER_SYNTAX):
                path = folder / f"{len(paths):06d}.dcm"
                pydicom.dcmwrite(path, ds, enforce_file_format=True)
                paths.append(path)
                if progress is not None:
                    progress(len(paths), expected)
        if not paths:
            raise PacsNotFound(f"{self.display} WADO-RS: the PACS sent no instances of the requested series")
        if len(paths) < expected:
            raise PacsProtocolError(
                f"{self.display} WADO-RS: received {len(paths)} of the {expected} instances listed"
            )
        return paths

    def store(self, datasets: Sequence[Any]) -> None:
        """STOW-RS the datasets; :class:`PacsStoreRejected` on an HTTP error or a FailedSOPSequence."""
        with self._errors("STOW-RS", store=True):
            response = self.client.store_instances(list(datasets))
        failed = list(getattr(response, "FailedSOPSequence", None) or []) if response is not None else []
        if failed:
            reasons = sorted({int(item.get("FailureReason", 0) or 0) for item in failed})
            codes = ", ".join(f"0x{r:04X}" for r in reasons)
            raise PacsStoreRejected(
                f"{self.display} STOW-RS: the PACS refused {len(failed)} of {len(datasets)} instance(s) "
                f"(FailureReason {codes})"
            )


__all__ = ["ANY_TRANSFER_SYNTAX", "DicomWebPacs", "http_error"]
