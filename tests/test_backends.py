"""The Runner protocol (cmdeploy.backends.base): both back ends implement it, fail alike, and the
one batching helper splits, pads and reassembles calls."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from cmdeploy.backends.base import Runner, run_batched
from cmdeploy.backends.onnxruntime import OnnxRuntimeRunner
from cmdeploy.backends.tensorrt import TensorRTRunner
from cmdeploy.errors import InputError


def test_onnxruntime_runner_is_a_runner(plain_model_path: Path, fused_model_path: Path) -> None:
    with OnnxRuntimeRunner(plain_model_path, threads=1) as r:
        assert isinstance(r, Runner)
        (name,) = r.input_names
        shape = r.input_shapes[name]
        assert isinstance(shape, tuple) and len(shape) == 4 and shape[0] is None
        assert r.batch_range == (1, None)
        x = np.zeros((3, *shape[1:]), np.float32)
        assert r.run({name: x})[r.output_names[0]].shape[0] == 3
    with OnnxRuntimeRunner(fused_model_path, threads=1) as r:
        assert sorted(r.input_names) == ["points", "slices"]
        assert all(isinstance(s, tuple) for s in r.input_shapes.values())


def test_missing_model_file_is_the_same_error_in_every_backend(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # the path is checked before any import
    for make in (OnnxRuntimeRunner, TensorRTRunner):
        with pytest.raises(InputError, match="not found"):
            make(tmp_path / "missing.model")


class _Recorder:
    """A runner accepting 2..4 items per call; output = input * 2; records call sizes."""

    input_names = ["x"]
    output_names = ["y"]
    input_shapes = {"x": (None, 3)}
    batch_range = (2, 4)

    def __init__(self) -> None:
        self.calls: list[int] = []

    def run(self, feeds):
        x = feeds["x"]
        assert 2 <= len(x) <= 4
        self.calls.append(len(x))
        return {"y": x * 2}

    def close(self) -> None:
        pass


@pytest.mark.parametrize(("n", "batch_size", "calls"), [(5, 16, [4, 2]), (1, 16, [2]), (7, 3, [3, 3, 2])])
def test_run_batched_splits_pads_and_reassembles(n: int, batch_size: int, calls: list[int]) -> None:
    r = _Recorder()
    assert isinstance(r, Runner)
    x = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    out = run_batched(r, {"x": x}, batch_size=batch_size)["y"]
    np.testing.assert_array_equal(out, x * 2)
    assert r.calls == calls
