"""Constant matrices of the PSP head: adaptive average pooling and bilinear resizing, 1-D.

A 2-D pooling or resize of an ``(..., H, W)`` map is ``M_h @ x @ M_w^T`` with these matrices.
:mod:`cmdeploy.train.model` registers them as buffers (so the exported ONNX has plain ``MatMul``
nodes) and :mod:`cmdeploy.calibration.graph` recognises them in a graph to rewrite the upsampling
as ``Resize``; both use this one NumPy implementation (no torch). Built in float64, returned as
float32.
"""

from __future__ import annotations

import numpy as np


def adaptive_pool_matrix(in_size: int, bins: int) -> np.ndarray:
    """``(bins, in_size)`` float32 matrix averaging bin i over ``[floor(i*n/b), ceil((i+1)*n/b))``.

    The bin edges are those of ``torch.nn.functional.adaptive_avg_pool2d``.
    """
    m = np.zeros((bins, in_size), np.float64)
    for i in range(bins):  # bins <= a handful: construction time only
        start = (i * in_size) // bins
        end = -((-(i + 1) * in_size) // bins)
        m[i, start:end] = 1.0 / (end - start)
    return m.astype(np.float32)


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """``(out_size, in_size)`` float32 matrix of 1-D linear interpolation with half-pixel centres.

    ``F.interpolate(..., mode="bilinear", align_corners=False)`` in PyTorch, ONNX
    ``Resize(mode="linear", coordinate_transformation_mode="half_pixel")``: source coordinate
    ``(dst + 0.5) * in / out - 0.5`` clamped at 0, neighbours clamped at the border.
    """
    dst = np.arange(out_size, dtype=np.float64)
    src = np.maximum((dst + 0.5) * (in_size / out_size) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    lam = np.clip(src - i0, 0.0, 1.0)
    m = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    np.add.at(m, (rows, i0), 1.0 - lam)
    np.add.at(m, (rows, i1), lam)
    return m.astype(np.float32)


__all__ = ["adaptive_pool_matrix", "bilinear_matrix"]
