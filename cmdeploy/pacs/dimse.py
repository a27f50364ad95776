"""DIMSE (classic DICOM networking) with pynetdicom: C-ECHO, C-FIND + C-GET of a series, C-STORE.

C-GET is used rather than C-MOVE: the instances come back on our own association, so the PACS needs
no route back to us (no listening port, no destination AE in its configuration), only permission for
our calling AE title to query and retrieve. CT Image Storage is offered as SCP (role selection) with
one presentation context per transfer syntax (uncompressed, deflated, RLE, JPEG, JPEG-LS, JPEG 2000),
so the PACS can send each instance as stored, without transcoding.

Failures raise the :mod:`cmdeploy.pacs.errors` types with the association result/source/reason or
the DIMSE status (hex and meaning); messages never contain UIDs or patient data.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmdeploy.errors import InputError
from cmdeploy.pacs.endpoints import DimseEndpoint, PacsOptions
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
VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
# transfer syntaxes offered for retrieved CT images, one presentation context each
RETRIEVE_TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
)
STORE_TRANSFER_SYNTAXES = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")
_STATUS_PENDING = (0xFF00, 0xFF01)
_STORE_WARNINGS = (0x0001, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007)


def _pynetdicom() -> Any:
    try:
        import pynetdicom
    except ImportError:
        raise InputError(f"DIMSE needs pynetdicom: {PACS_EXTRA_HINT}") from None
    return pynetdicom


def status_text(code: int, table: str = "STORAGE_SERVICE_CLASS_STATUS") -> str:
    """``0xA700 (Refused: Out of Resources)``: a DIMSE status as hex with pynetdicom's meaning."""
    from pynetdicom import status

    meaning = getattr(status, table, {}).get(code, (None, ""))[1] or status.code_to_category(code)
    return f"0x{code:04X} ({meaning})" if meaning else f"0x{code:04X}"


@dataclass
class _Events:
    """What pynetdicom reported about one association (filled by its event handlers)."""

    connected: bool = False
    received: list[Any] = field(default_factory=list)

    def on_open(self, event: Any) -> None:
        self.connected = True

    def on_acse(self, event: Any) -> None:
        self.received.append(event.primitive)

    def last(self, kind: str) -> Any:
        for p in reversed(self.received):
            if type(p).__name__ == kind:
                return p
        return None

    def peer_aborted(self) -> Any:
        return self.last("A_ABORT") or self.last("A_P_ABORT")


def diagnose_connect(host: str, port: int, timeout: float, what: str) -> PacsError:
    """Why a TCP connection to ``host:port`` fails: unknown host / refused -> unreachable,
    no answer -> timeout (checked with a plain socket, after pynetdicom failed to connect)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except socket.gaierror:
        return PacsUnreachable(f"{what}: unknown host")
    except TimeoutError:
        return PacsTimeout(f"{what}: no TCP connection within {timeout:g} s")
    except ConnectionRefusedError:
        return PacsUnreachable(f"{what}: connection refused (is the PACS running, is the port right?)")
    except OSError as exc:
        return PacsUnreachable(f"{what}: cannot connect ({type(exc).__name__}, errno {exc.errno})")
    return PacsUnreachable(f"{what}: the connection failed")


class DimsePacs:
    """A DICOM node reached with pynetdicom.

        >>> pacs = DimsePacs(DimseEndpoint("ORTHANC", "pacs", 4242), PacsOptions(calling_aet="CMDEPLOY"))
        >>> pacs.check()                                    # C-ECHO
        >>> paths = pacs.fetch_series(study_uid, series_uid, folder)   # C-FIND + C-GET
        >>> pacs.store([seg_dataset])                       # C-STORE
    """

    def __init__(self, endpoint: DimseEndpoint, options: PacsOptions | None = None) -> None:
        _pynetdicom()
        self.endpoint = endpoint
        self.options = options or PacsOptions()

    @property
    def display(self) -> str:
        return self.endpoint.display

    # ------------------------------------------------------------------ association
    def _ae(self, contexts: Sequence[tuple[str, Sequence[str]]]) -> Any:
        from pynetdicom import AE

        ae = AE(ae_title=self.options.calling_aet)
        t = float(self.options.timeout)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = t
        for abstract, syntaxes in contexts:
            for ts in syntaxes:  # one context per transfer syntax: the peer accepts each as it can
                ae.add_requested_context(abstract, ts)
        return ae

    @contextmanager
    def _association(
        self,
        contexts: Sequence[tuple[str, Sequence[str]]],
        *,
        purpose: str,
        ext_neg: list[Any] | None = None,
        handlers: list[tuple[Any, Callable[..., Any]]] | None = None,
        no_context: type[PacsError] = PacsRefused,
    ) -> Iterator[tuple[Any, _Events]]:
        from pynetdicom import evt

        ev = _Events()
        ae = self._ae(contexts)
        hs = [(evt.EVT_CONN_OPEN, ev.on_open), (evt.EVT_ACSE_RECV, ev.on_acse), *(handlers or [])]
        e = self.endpoint
        assoc = ae.associate(e.host, e.port, ae_title=e.aet, ext_neg=ext_neg, evt_handlers=hs)
        if not assoc.is_established:
            raise self._association_failure(assoc, ev, purpose, no_context)
        try:
            yield assoc, ev
        except BaseException:
            assoc.abort()
            raise
        else:
            if assoc.is_established:
                assoc.release()
        finally:
            ae.shutdown()

    def _association_failure(
        self, assoc: Any, ev: _Events, purpose: str, no_context: type[PacsError]
    ) -> PacsError:
        what = f"{self.display} ({purpose})"
        if not ev.connected:
            return diagnose_connect(self.endpoint.host, self.endpoint.port, self.options.timeout, what)
        rsp = ev.last("A_ASSOCIATE")
        if assoc.is_rejected and rsp is not None:
            result = getattr(rsp, "result", None)
            return PacsRefused(
                f"{what}: association rejected - {rsp.result_str}, source {rsp.source_str}, reason "
                f"{rsp.reason_str} (result {result}, source {rsp.result_source}, reason "
                f"{rsp.diagnostic}); check the called AE title and that the PACS knows our calling "
                f"AE title {self.options.calling_aet!r}",
                transient=result == 2,
            )
        if rsp is not None and getattr(rsp, "result", None) == 0:
            return no_context(f"{what}: the PACS accepted none of the proposed presentation contexts")
        if ev.peer_aborted() is not None:
            return PacsRefused(f"{what}: the PACS aborted the association request")
        if rsp is None:
            return PacsTimeout(
                f"{what}: no answer to the association request within {self.options.timeout:g} s"
            )
        return PacsProtocolError(f"{what}: association failed")

    def _no_response(self, ev: _Events, started: float, what: str, refused: type[PacsError]) -> PacsError:
        """An empty status: the peer aborted (a refusal) or our DIMSE timeout fired."""
        elapsed = time.perf_counter() - started
        if ev.peer_aborted() is not None or elapsed < 0.9 * self.options.timeout:
            return refused(
                f"{what}: the PACS aborted the association instead of answering (is our calling AE "
                f"title {self.options.calling_aet!r} allowed to do this?)"
            )
        return PacsTimeout(f"{what}: no answer within {self.options.timeout:g} s")

    # ------------------------------------------------------------------ operations
    def check(self) -> None:
        """C-ECHO: the node is up, accepts our AE titles and answers."""
        with self._association([(VERIFICATION, STORE_TRANSFER_SYNTAXES)], purpose="C-ECHO") as (assoc, ev):
            t0 = time.perf_counter()
            status = assoc.send_c_echo()
            if "Status" not in status:
                raise self._no_response(ev, t0, f"{self.display} C-ECHO", PacsRefused)
            if status.Status != 0x0000:
                text = status_text(status.Status, "GENERAL_STATUS")
                raise PacsRefused(f"{self.display} C-ECHO: status {text}")

    def _find_series(self, assoc: Any, ev: _Events, study_uid: str, series_uid: str) -> int | None:
        """C-FIND at SERIES level: the number of instances the PACS lists (None if it does not say);
        :class:`PacsNotFound` when no series matches."""
        from pydicom.dataset import Dataset

        q = Dataset()
        q.QueryRetrieveLevel = "SERIES"
        q.StudyInstanceUID = study_uid
        q.SeriesInstanceUID = series_uid
        q.NumberOfSeriesRelatedInstances = ""
        what = f"{self.display} C-FIND"
        matches: list[int | None] = []
        t0 = time.perf_counter()
        for status, identifier in assoc.send_c_find(q, STUDY_ROOT_FIND):
            if "Status" not in status:
                raise self._no_response(ev, t0, what, PacsRefused)
            code = int(status.Status)
            if code in _STATUS_PENDING:
                n = identifier.get("NumberOfSeriesRelatedInstances") if identifier is not None else None
                matches.append(int(n) if n not in (None, "") else None)
            elif code != 0x0000:
                raise PacsProtocolError(f"{what}: status {status_text(code, 'QR_FIND_SERVICE_CLASS_STATUS')}")
        if not matches or matches[0] == 0:
            raise PacsNotFound(
                f"{self.display}: the requested series is not on the PACS (C-FIND found no match)"
            )
        return matches[0]

    def count_instances(self, study_uid: str, series_uid: str) -> int | None:
        """Instances of the series according to C-FIND (None when the PACS does not count)."""
        with self._association([(STUDY_ROOT_FIND, STORE_TRANSFER_SYNTAXES)], purpose="C-FIND") as (a, ev):
            return self._find_series(a, ev, study_uid, series_uid)

    def fetch_series(
        self,
        study_uid: str,
        series_uid: str,
        folder: str | Path,
        progress: Callable[[int, int | None], None] | None = None,
    ) -> list[Path]:
        """C-FIND the series, then C-GET it into ``folder`` (``000000.dcm``, ... as received).

        ``progress(received, expected)`` is called after each instance.
        """
        from pydicom.dataset import Dataset
        from pynetdicom import build_role, evt

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths: list[Path] = []
        problems: list[str] = []
        expected: list[int | None] = [None]

        def on_store(event: Any) -> int:
            path = folder / f"{len(paths):06d}.dcm"
            try:
                path.write_bytes(event.encoded_dataset(include_meta=True))
            except OSError as exc:
                problems.append(f"cannot write a retrieved instance ({type(exc).__name__})")
                return 0xA700
            paths.append(path)
            if progress is not None:
                progress(len(paths), expected[0])
            return 0x0000

        contexts = [
            (STUDY_ROOT_FIND, STORE_TRANSFER_SYNTAXES),
            (STUDY_ROOT_GET, STORE_TRANSFER_SYNTAXES),
            (CT_IMAGE_STORAGE, RETRIEVE_TRANSFER_SYNTAXES),
        ]
        role = build_role(CT_IMAGE_STORAGE, scp_role=True)
        with self._association(
            contexts, purpose="C-GET", ext_neg=[role], handlers=[(evt.EVT_C_STORE, on_store)]
        ) as (assoc, ev):
            expected[0] = self._find_series(assoc, ev, study_uid, series_uid)
            q = Dataset()
            q.QueryRetrieveLevel = "SERIES"
            q.StudyInstanceUID = study_uid
            q.SeriesInstanceUID = series_uid
            what = f"{self.display} C-GET"
            final = None
            t0 = time.perf_counter()
            for status, _ in assoc.send_c_get(q, STUDY_ROOT_GET):
                if "Status" not in status:
                    raise self._no_response(ev, t0, what, PacsRefused)
                t0 = time.perf_counter()
                if int(status.Status) not in _STATUS_PENDING:
                    final = status
        if problems:
            raise PacsProtocolError(f"{what}: {problems[0]}")
        code = int(final.Status) if final is not None else -1
        failed = int(final.get("NumberOfFailedSuboperations", 0) or 0) if final is not None else 0
        if code != 0x0000 or failed:
            detail = status_text(code, "QR_GET_SERVICE_CLASS_STATUS") if code >= 0 else "none"
            raise PacsProtocolError(
                f"{what}: final status {detail}, {failed} instance(s) failed, {len(paths)} received "
                "(does the series hold other than single-frame CT images?)"
            )
        if not paths:
            raise PacsNotFound(f"{what}: the PACS sent no instances of the requested series")
        if expected[0] is not None and len(paths) < expected[0]:
            raise PacsProtocolError(f"{what}: received {len(paths)} of the {expected[0]} instances listed")
        return paths

    def store(self, datasets: Sequence[Any]) -> None:
        """C-STORE each dataset (SEG or any other SOP class the datasets declare)."""
        classes = sorted({str(ds.SOPClassUID) for ds in datasets})
        contexts = [(c, STORE_TRANSFER_SYNTAXES) for c in classes]
        with self._association(contexts, purpose="C-STORE", no_context=PacsStoreRejected) as (assoc, ev):
            accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
            missing = [c for c in classes if c not in accepted]
            if missing:
                from pydicom.uid import UID

                raise PacsStoreRejected(
                    f"{self.display} C-STORE: the PACS accepts no presentation context for "
                    f"{', '.join(UID(c).name for c in missing)}"
                )
            for ds in datasets:
                what = f"{self.display} C-STORE of {_kind(ds)}"
                t0 = time.perf_counter()
                status = assoc.send_c_store(ds)
                if "Status" not in status:
                    raise self._no_response(ev, t0, what, PacsStoreRejected)
                code = int(status.Status)
                if code != 0x0000 and code not in _STORE_WARNINGS:
                    raise PacsStoreRejected(f"{what}: status {status_text(code)}")


def _kind(ds: Any) -> str:
    """``the SEG`` / ``a CT image`` style name of a dataset (from its Modality)."""
    modality = str(ds.get("Modality", "") or "").upper()
    return f"the {modality}" if modality else "the instance"


__all__ = ["DimsePacs", "diagnose_connect", "status_text"]
