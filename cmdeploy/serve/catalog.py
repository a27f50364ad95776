"""The series a server offers: everything readable under ``--data``, by opaque id.

A series is a NIfTI file (``.nii``/``.nii.gz``; files whose name starts with ``label``, ``seg`` or
``mask`` are label maps and skipped) or a folder that directly holds DICOM CT images (read with
:func:`cmdeploy.io.read_dicom_series`; non-CT modalities skipped). ``--data`` may also be one
such file or folder. Ids are the first 12 hex digits of the SHA-256 of the path relative to
``--data``; a request's id is only ever looked up in this table, never joined to a path, so no id
can reach outside ``--data``. Series open at start-up (headers only; slices are read on demand
and the most recent ones kept in a small cache). A gzipped NIfTI has no random access (every slice
read decompresses the file up to it), so the first slice request of one reads the whole volume
once as float32, for at most :data:`MAX_VOLUMES` such series at a time.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cmdeploy.errors import InputError
from cmdeploy.io import Series, open_series
from cmdeploy.io.dicom_series import has_dicm_marker

log = logging.getLogger("cmdeploy.serve")
_LABEL_PREFIXES = ("label", "seg", "mask")
_MAX_ENTRIES = 10_000  # directories + files looked at under --data
MAX_VOLUMES = 2  # whole gzipped-NIfTI volumes held in memory (least recently used dropped)
_volumes: OrderedDict[str, np.ndarray] = OrderedDict()
_volumes_lock = threading.Lock()


def _whole_volume(entry: CatalogEntry) -> np.ndarray:
    """(N, H, W) float32 slices of a gzipped NIfTI entry, read once (equal to ``slice_hu``)."""
    from cmdeploy.io.nifti import read_lps_volume

    with _volumes_lock:
        vol = _volumes.get(entry.id)
        if vol is not None:
            _volumes.move_to_end(entry.id)
            return vol
        data, _, _ = read_lps_volume(entry.series.path)  # (X, Y, Z); slice k = data[:, :, k].T
        vol = np.ascontiguousarray(np.transpose(data, (2, 1, 0)), dtype=np.float32)
        if vol.shape != (entry.series.num_slices, *entry.series.shape) or not np.isfinite(vol).all():
            raise InputError("NIfTI volume does not match its slices or holds NaN/inf")
        vol.setflags(write=False)
        _volumes[entry.id] = vol
        while len(_volumes) > MAX_VOLUMES:
            _volumes.popitem(last=False)
        return vol


@dataclass(eq=False)
class CatalogEntry:
    """One series: ``id`` (opaque), ``name`` (path relative to ``--data``, shown in the page),
    the opened :class:`Series`, and a small LRU cache of its float32 HU slices."""

    id: str
    name: str
    series: Series
    cache_slices: int = 16
    _cache: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def slice_hu(self, k: int) -> np.ndarray:
        """Slice ``k`` as float32 (H, W) HU (cached; read-only array)."""
        n = self.series.num_slices
        if not 0 <= int(k) < n:
            raise IndexError(f"slice index {k} outside 0..{n - 1}")
        with self._lock:
            hit = self._cache.get(int(k))
            if hit is not None:
                self._cache.move_to_end(int(k))
                return hit
        if self.series.kind == "nifti" and self.series.path.name.lower().endswith(".gz"):
            return _whole_volume(self)[int(k)]
        arr = self.series.slice_hu(int(k))
        arr.setflags(write=False)
        with self._lock:
            self._cache[int(k)] = arr
            while len(self._cache) > self.cache_slices:
                self._cache.popitem(last=False)
        return arr

    @property
    def slug(self) -> str:
        """A file-name-safe folder name for this series' exports."""
        text = re.sub(r"[^A-Za-z0-9._-]+", "_", self.name).strip("._") or "series"
        return f"{text[:80]}-{self.id[:6]}"


def series_id(relative: str) -> str:
    """Opaque id of a series from its path relative to ``--data``."""
    return hashlib.sha256(relative.encode("utf-8")).hexdigest()[:12]


def _is_nifti(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith((".nii", ".nii.gz")) and not name.startswith(_LABEL_PREFIXES)


def _modality(path: Path) -> str:
    import pydicom

    try:
        return str(
            pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"]).get("Modality", "")
        )
    except Exception:
        return ""


def _candidates(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    found: list[Path] = []
    seen = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        seen += len(filenames) + 1
        if seen > _MAX_ENTRIES:
            log.warning("stopped scanning --data after %d entries", _MAX_ENTRIES)
            break
        here = Path(dirpath)
        files = sorted(filenames)
        found += [here / f for f in files if _is_nifti(here / f)]
        dicoms = [here / f for f in files if not f.startswith(".") and has_dicm_marker(here / f)]
        if dicoms and _modality(dicoms[0]) == "CT":
            found.append(here)
    return found


class Catalog:
    """Every series under ``root``, by id (see the module docstring)."""

    def __init__(self, root: str | Path, *, cache_slices: int = 16) -> None:
        self.root = Path(root).resolve()
        if not self.root.exists():
            raise InputError(f"--data '{root}' does not exist")
        self.entries: dict[str, CatalogEntry] = {}
        skipped = 0
        for path in _candidates(self.root):
            try:
                real = path.resolve()
                if real != self.root and self.root not in real.parents:
                    skipped += 1  # a link out of --data
                    continue
                series = open_series(real)
            except (InputError, OSError, ValueError):
                skipped += 1
                continue
            rel = real.relative_to(self.root).as_posix() if real != self.root else real.name
            entry = CatalogEntry(series_id(rel), rel, series, cache_slices=cache_slices)
            self.entries[entry.id] = entry
        log.info("serving %d series (%d candidate(s) skipped)", len(self.entries), skipped)

    def get(self, sid: str) -> CatalogEntry:
        """The entry with id ``sid``; KeyError when there is none."""
        return self.entries[sid]

    def __len__(self) -> int:
        return len(self.entries)
