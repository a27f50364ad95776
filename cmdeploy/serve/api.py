"""Routes of ``/api/v1``: series, slices, segment, objects, propagate, export, CVAT.

Every route reads the shared :class:`ServerState` from ``request.app.state.cmdeploy``. Errors are
raised as :class:`~cmdeploy.errors.InputError` (-> 400), ``KeyError`` (-> 404) or
``IndexError`` (-> 404) and turned into JSON by the handlers in :mod:`cmdeploy.serve.app`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response

from cmdeploy.errors import InputError
from cmdeploy.guidance import sort_extreme_points
from cmdeploy.serve import cvat, store
from cmdeploy.serve.batching import MicroBatcher
from cmdeploy.serve.catalog import Catalog, CatalogEntry
from cmdeploy.serve.masks import mask_to_rle, outer_contour, rle_to_mask
from cmdeploy.serve.schemas import (
    ExportRequest,
    ExportResponse,
    Geometry,
    Labels,
    Mask,
    ObjectIn,
    ObjectOut,
    PropagateRequest,
    SegmentRequest,
    SegmentResponse,
    SeriesInfo,
)

router = APIRouter(prefix="/api/v1")


@dataclass
class ServerState:
    """What the routes share: the catalog, the one Segmenter behind its batcher, the objects."""

    catalog: Catalog
    batcher: MicroBatcher
    objects: store.ObjectStore
    output: Path

    @property
    def segmenter(self) -> Any:
        return self.batcher.segmenter


def _state(request: Request) -> ServerState:
    return request.app.state.cmdeploy


def _entry(request: Request, sid: str) -> CatalogEntry:
    try:
        return _state(request).catalog.get(sid)
    except KeyError:
        raise KeyError("no series with this id") from None


def _sorted_points(points: Any) -> np.ndarray:
    try:
        return sort_extreme_points(points)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def _area_mm2(entry: CatalogEntry, area_px: int) -> float | None:
    sp = entry.series.spacing_xy_mm
    return None if sp is None else round(float(area_px * sp[0] * sp[1]), 2)


_LPS_LETTERS = (("R", "L"), ("A", "P"), ("F", "H"))  # patient (-, +) along L, P, S


def _direction_letter(cosines: np.ndarray) -> str:
    """Patient direction letter of a unit vector in LPS: its dominant axis, e.g. (1, 0, 0) -> "L"."""
    axis = int(np.argmax(np.abs(cosines)))
    return _LPS_LETTERS[axis][int(cosines[axis] > 0)]


def orientation_labels(series) -> list[str] | None:
    """Patient directions at the left, right, top and bottom edge of the displayed slice.

    DICOM: from ImageOrientationPatient (row cosines = direction of increasing x, column cosines
    = increasing y). NIfTI: slices are in the LPS display frame, always ``R, L, A, P``.
    """
    if series.kind == "nifti":
        return ["R", "L", "A", "P"]
    if series.orientation is None:
        return None
    row, col = np.asarray(series.orientation[:3]), np.asarray(series.orientation[3:])
    return [_direction_letter(-row), _direction_letter(row), _direction_letter(-col), _direction_letter(col)]


def _info(entry: CatalogEntry) -> SeriesInfo:
    s = entry.series
    return SeriesInfo(
        id=entry.id, name=entry.name, kind=s.kind, num_slices=s.num_slices, rows=s.height, columns=s.width
    )


def _segment(state: ServerState, entry: CatalogEntry, k: int, points: np.ndarray) -> SegmentResponse:
    t0 = time.perf_counter()
    hu = entry.slice_hu(k)
    res = state.batcher.predict(hu, points)
    mask = state.segmenter.to_mask(res.probabilities, points)
    area = int(mask.sum())
    h, w = mask.shape
    return SegmentResponse(
        slice_index=k,
        points=[tuple(p) for p in points.tolist()],
        mask=Mask(rows=h, columns=w, rle=mask_to_rle(mask)),
        contour=[tuple(c) for c in outer_contour(mask)],
        area_px=area,
        area_mm2=_area_mm2(entry, area),
        model_ms=round(res.model_ms, 3),
        batch_size=res.batch_size,
        total_ms=round((time.perf_counter() - t0) * 1000.0, 3),
    )


def _object_out(entry: CatalogEntry, o: store.AcceptedObject, *, with_mask: bool) -> ObjectOut:
    h, w = o.mask.shape
    return ObjectOut(
        id=o.id,
        label=o.label,
        slice_index=o.slice_index,
        points=[tuple(p) for p in np.asarray(o.points).tolist()],
        area_px=o.area_px,
        area_mm2=_area_mm2(entry, o.area_px),
        mask=Mask(rows=h, columns=w, rle=mask_to_rle(o.mask)) if with_mask else None,
        contour=[tuple(c) for c in outer_contour(o.mask)] if with_mask else [],
    )


# ----------------------------------------------------------------------------------- series
@router.get("/series", response_model=list[SeriesInfo], summary="List the series under --data")
def list_series(request: Request) -> list[SeriesInfo]:
    return [_info(e) for e in _state(request).catalog.entries.values()]


@router.get("/series/{sid}", response_model=Geometry, summary="Series geometry")
def series_geometry(request: Request, sid: str) -> Geometry:
    e = _entry(request, sid)
    s = e.series
    positions = None
    if s.positions_mm is not None and s.slice_normal is not None:
        positions = [round(float(v), 4) for v in s.positions_mm @ s.slice_normal]
    return Geometry(
        **_info(e).model_dump(),
        spacing_xy_mm=None if s.spacing_xy_mm is None else tuple(float(v) for v in s.spacing_xy_mm),
        slice_positions_mm=positions,
        orientation=None if s.orientation is None else [float(v) for v in s.orientation],
        orientation_labels=orientation_labels(s),
    )


@router.get(
    "/series/{sid}/slices/{k}",
    summary="Slice pixels: raw int16 little-endian HU, row-major (rows x columns)",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def slice_pixels(request: Request, sid: str, k: int) -> Response:
    e = _entry(request, sid)
    hu = e.slice_hu(k)
    data = np.clip(np.rint(hu), -32768, 32767).astype("<i2").tobytes()
    headers = {
        "X-Rows": str(hu.shape[0]),
        "X-Columns": str(hu.shape[1]),
        "Cache-Control": "private, max-age=3600",
    }
    return Response(content=data, media_type="application/octet-stream", headers=headers)


# ---------------------------------------------------------------------------------- segment
@router.post("/series/{sid}/segment", response_model=SegmentResponse, summary="Mask from four clicks")
def segment(request: Request, sid: str, body: SegmentRequest) -> SegmentResponse:
    e = _entry(request, sid)
    return _segment(_state(request), e, body.slice_index, _sorted_points(body.points))


@router.post(
    "/series/{sid}/propagate",
    response_model=SegmentResponse,
    summary="Segment slice k +/- 1 from the extreme points of an accepted object on slice k",
)
def propagate(request: Request, sid: str, body: PropagateRequest) -> SegmentResponse:
    state = _state(request)
    e = _entry(request, sid)
    obj = state.objects.get(sid, body.object_id)
    k = obj.slice_index + body.direction
    if not 0 <= k < e.series.num_slices:
        raise InputError(f"no slice {k}: the series has slices 0..{e.series.num_slices - 1}")
    return _segment(state, e, k, store.propagation_points(obj.mask))


# ---------------------------------------------------------------------------------- objects
@router.get("/series/{sid}/objects", response_model=list[ObjectOut], summary="Accepted objects")
def list_objects(
    request: Request, sid: str, slice_index: int | None = None, masks: bool = True
) -> list[ObjectOut]:
    e = _entry(request, sid)
    return [_object_out(e, o, with_mask=masks) for o in _state(request).objects.list(sid, slice_index)]


def _accepted(state: ServerState, e: CatalogEntry, body: ObjectIn, oid: int) -> store.AcceptedObject:
    label = store.check_label(body.label)
    k = body.slice_index
    if not 0 <= k < e.series.num_slices:
        raise InputError(f"slice_index {k} outside 0..{e.series.num_slices - 1}")
    points = _sorted_points(body.points)
    if body.mask is not None:
        if (body.mask.rows, body.mask.columns) != e.series.shape:
            raise InputError(f"mask must be {e.series.height} x {e.series.width}")
        mask = rle_to_mask(body.mask.rle, e.series.shape)
    else:
        res = state.batcher.predict(e.slice_hu(k), points)
        mask = state.segmenter.to_mask(res.probabilities, points)
    return store.AcceptedObject(oid, k, label, points, mask)


@router.post("/series/{sid}/objects", response_model=ObjectOut, status_code=201, summary="Accept an object")
def add_object(request: Request, sid: str, body: ObjectIn) -> ObjectOut:
    state, e = _state(request), _entry(request, sid)
    return _object_out(e, state.objects.put(sid, _accepted(state, e, body, 0)), with_mask=True)


@router.put("/series/{sid}/objects/{oid}", response_model=ObjectOut, summary="Replace an object")
def replace_object(request: Request, sid: str, oid: int, body: ObjectIn) -> ObjectOut:
    state, e = _state(request), _entry(request, sid)
    state.objects.get(sid, oid)
    return _object_out(e, state.objects.put(sid, _accepted(state, e, body, oid)), with_mask=True)


@router.delete("/series/{sid}/objects/{oid}", status_code=204, summary="Delete an object")
def delete_object(request: Request, sid: str, oid: int) -> Response:
    _entry(request, sid)
    _state(request).objects.delete(sid, oid)
    return Response(status_code=204)


@router.get("/labels", response_model=Labels, summary="Labels used so far (most recent first)")
def labels(request: Request) -> Labels:
    return Labels(labels=_state(request).objects.labels())


# ----------------------------------------------------------------------------------- export
@router.post("/series/{sid}/export", response_model=ExportResponse, summary="Write SEG / NIfTI / points CSV")
def export(request: Request, sid: str, body: ExportRequest) -> ExportResponse:
    state, e = _state(request), _entry(request, sid)
    formats = store.export_formats(e, body.formats)
    objs = state.objects.list(sid)
    written = store.export(e, objs, state.output, formats)
    folder = state.output / e.slug
    return ExportResponse(folder=str(folder), files=[p.name for p in written], objects=len(objs))


# ------------------------------------------------------------------------------------- CVAT
def cvat_interactor(request_body: Any, state: ServerState) -> dict[str, Any]:
    """CVAT's interactor request -> ``{"mask", "points"}`` through the shared batcher."""
    seg = state.segmenter
    hu, points = cvat.parse_request(request_body, seg.spec.window)
    res = state.batcher.predict(hu, points)
    return cvat.cvat_response(seg.to_mask(res.probabilities, points))


@router.post("/cvat", summary="CVAT serverless interactor (DEXTR-compatible request and answer)")
def cvat_route(request: Request, body: dict[str, Any]) -> dict[str, Any]:
    return cvat_interactor(body, _state(request))
