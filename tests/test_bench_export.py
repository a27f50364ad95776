"""benchmarks/bench_export.py on a tiny random checkpoint: runs end to end, JSON structure, table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from cmdeploy.spec import ModelSpec  # noqa: E402
from cmdeploy.train.checkpoint import Checkpoint  # noqa: E402
from cmdeploy.train.model import build_model, make_config  # noqa: E402

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
SIZE = 64


def load_bench():
    """benchmarks/bench_export.py (not a package), imported by path."""
    spec = importlib.util.spec_from_file_location("bench_export", ROOT / "benchmarks" / "bench_export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    spec = ModelSpec.for_input_size(SIZE)
    cfg = make_config("compact", spec.num_channels, depth=18, base_width=8, input_size=SIZE, psp_channels=16)
    path = tmp_path_factory.mktemp("bench") / "tiny.pt"
    Checkpoint.from_model(build_model(cfg).eval(), spec).save(path)
    return path


def test_runs_and_writes_json(tiny_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_bench()
    out = tmp_path / "r.json"
    argv = ["--checkpoint", str(tiny_ckpt), "--threads", "1", "--batch-sizes", "1,2",
            "--iterations", "1", "--warmup", "0", "--gap-ms", "0", "--json", str(out)]
    result = bench.main(argv)
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(result))
    assert {"machine", "config", "results", "max_abs_diff"} <= set(data)
    assert {"cpu_model", "logical_cores", "torch", "onnxruntime"} <= set(data["machine"])
    assert data["config"]["onnx_exported_here"] is True
    assert data["config"]["input_shape"] == ["batch", 2, SIZE, SIZE]
    rows = data["results"]
    assert [(r["backend"], r["batch"]) for r in rows] == [
        ("torch", 1), ("onnxruntime", 1), ("torch", 2), ("onnxruntime", 2)
    ]
    for r in rows:
        assert r["iterations"] == 1
        assert 0 < r["median_ms"] <= r["p95_ms"]
        assert r["items_per_s"] > 0
        if r["backend"] == "onnxruntime":
            torch_row = next(t for t in rows if t["backend"] == "torch" and t["batch"] == r["batch"])
            assert r["torch_over_ort"] == pytest.approx(torch_row["median_ms"] / r["median_ms"])
        else:
            assert r["torch_over_ort"] is None
    assert set(data["max_abs_diff"]) == {"1", "2"}
    assert all(v < 1e-3 for v in data["max_abs_diff"].values())  # same model in both backends
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert table[0] == "| backend | batch | median ms | p95 ms | items/s | torch/ORT |"
    assert len(table) == 2 + len(rows)


def test_bad_batch_sizes_are_named() -> None:
    bench = load_bench()
    assert bench.parse_batch_sizes(" 1, 16,") == [1, 16]
    with pytest.raises(ValueError, match="'x'"):
        bench.parse_batch_sizes("1,x")
    with pytest.raises(ValueError, match=">= 1"):
        bench.parse_batch_sizes("0")
