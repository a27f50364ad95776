"""Request and response bodies of ``/api/v1`` (pydantic; shown in the OpenAPI schema at ``/docs``).

Points are ``[x, y]`` pixels, x = column, y = row, pixel centres at integers. Masks travel as
row-major run lengths, background first (:mod:`cmdeploy.serve.masks`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

Point = tuple[float, float]


class SeriesInfo(BaseModel):
    id: str = Field(description="opaque series id")
    name: str = Field(description="path relative to --data")
    kind: str
    num_slices: int
    rows: int
    columns: int


class Geometry(SeriesInfo):
    spacing_xy_mm: tuple[float, float] | None = Field(description="(between columns, between rows)")
    slice_positions_mm: list[float] | None = Field(description="position of each slice along its normal")
    orientation: list[float] | None = Field(description="DICOM ImageOrientationPatient, 6 values")
    orientation_labels: list[str] | None = Field(
        description="patient direction (R/L/A/P/H/F) at the left, right, top, bottom edge of the view"
    )
    pixel_format: str = "int16 little-endian HU, row-major [y, x]; GET .../slices/{k}"


class Mask(BaseModel):
    rows: int
    columns: int
    rle: list[int] = Field(description="row-major run lengths, background first")


class SegmentRequest(BaseModel):
    slice_index: int = Field(ge=0)
    points: list[Point] = Field(min_length=4, max_length=4, description="four clicks, any order")


class SegmentResponse(BaseModel):
    slice_index: int
    points: list[Point] = Field(description="sorted: left, right, top, bottom")
    mask: Mask
    contour: list[tuple[int, int]] = Field(description="outer boundary [x, y] of the largest piece")
    area_px: int
    area_mm2: float | None
    model_ms: float = Field(description="wall time of the model call (shared by its batch)")
    batch_size: int
    total_ms: float = Field(description="server time for this request")


class ObjectIn(BaseModel):
    label: str = Field(min_length=1, max_length=64)
    slice_index: int = Field(ge=0)
    points: list[Point] = Field(min_length=4, max_length=4, description="four clicks, any order")
    mask: Mask | None = Field(default=None, description="the accepted mask; segmented again when absent")


class ObjectOut(BaseModel):
    id: int
    label: str
    slice_index: int
    points: list[Point]
    area_px: int
    area_mm2: float | None
    mask: Mask | None = None
    contour: list[tuple[int, int]] = []


class PropagateRequest(BaseModel):
    object_id: int
    direction: Literal[-1, 1] = Field(description="+1: next slice (k + 1), -1: previous")


class ExportRequest(BaseModel):
    formats: list[Literal["dicom-seg", "nifti", "csv"]] | None = Field(
        default=None, description="default: every format that applies to the series"
    )


class ExportResponse(BaseModel):
    folder: str
    files: list[str]
    objects: int


class Labels(BaseModel):
    labels: list[str]
