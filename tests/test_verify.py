"""``cmdeploy verify``: two models on the same real inputs; identical, perturbed, plain vs fused, INT8."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from onnx import numpy_helper  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from cmdeploy.cli import app  # noqa: E402
from cmdeploy.errors import InputError  # noqa: E402
from cmdeploy.export.fused import export_fused  # noqa: E402
from cmdeploy.export.onnx_export import export_onnx  # noqa: E402
from cmdeploy.export.parity import CT_SMALL_POINT_SETS, ct_small_cases, ct_small_path, read_slice  # noqa: E402
from cmdeploy.export.verify import load_cases, verify_models  # noqa: E402
from cmdeploy.preprocess import prepare_batch  # noqa: E402
from cmdeploy.spec import ModelSpec  # noqa: E402
from cmdeploy.train.checkpoint import Checkpoint  # noqa: E402
from cmdeploy.train.model import build_model, make_config  # noqa: E402

torch.set_num_threads(1)
SIZE = 64


def _tiny_checkpoint(path: Path) -> ModelSpec:
    """Random ResNet-18 (width 8, 64 px), classifier calibrated to ~50 % foreground on CT_small."""
    torch.manual_seed(0)
    spec = ModelSpec.for_input_size(SIZE)
    cfg = make_config("compact", 2, depth=18, base_width=8, input_size=SIZE, psp_channels=16)
    model = build_model(cfg).eval()
    cases = ct_small_cases()
    x, _ = prepare_batch([c.slice_hu for c in cases], [c.points for c in cases], spec)
    with torch.no_grad():
        torch.nn.init.normal_(model.head.classifier.weight, std=0.5)
        model.head.classifier.bias -= float(np.median(model(torch.from_numpy(x)).numpy()))
    Checkpoint.from_model(model, spec).save(path)
    return spec


def _perturbed(src: Path, dst: Path, delta: float) -> Path:
    """Copy of a plain model with ``delta`` added to the final 1-channel conv's bias (a logit shift)."""
    model = onnx.load(str(src))
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Conv" and len(node.input) == 3:
            w = numpy_helper.to_array(inits[node.input[1]])
            if w.shape[0] == 1:
                b = numpy_helper.to_array(inits[node.input[2]]) + np.float32(delta)
                inits[node.input[2]].CopyFrom(numpy_helper.from_array(b, node.input[2]))
                break
    else:  # pragma: no cover
        raise AssertionError("no 1-channel conv found")
    onnx.save(model, str(dst))
    return dst


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("verify")
    _tiny_checkpoint(d / "tiny.pt")
    two = ct_small_cases()[:2]
    plain = export_onnx(d / "tiny.pt", d / "plain.onnx", parity_slices=two).path
    fused = export_fused(d / "tiny.pt", d / "fused.onnx", parity_slices=two).path
    return {
        "dir": d,
        "plain": plain,
        "fused": fused,
        "shifted": _perturbed(plain, d / "shifted.onnx", 1.5),
        "nudged": _perturbed(plain, d / "nudged.onnx", 1e-3),
    }


def test_model_against_itself_is_identical(models) -> None:
    res = verify_models(models["plain"], models["plain"])
    rep = res.report
    assert res.ok, res.summary()
    assert rep.max_abs == 0.0 and rep.mean_abs == 0.0
    assert rep.mask_agreement == 1.0 and rep.dice == 1.0
    assert rep.n_items == len(load_cases()) > 0
    assert 0.1 < rep.foreground < 0.9


def test_perturbed_copy_fails_and_small_nudge_passes(models) -> None:
    bad = verify_models(models["plain"], models["shifted"])
    assert not bad.ok
    assert bad.report.max_abs > 0.1
    assert bad.report.mask_agreement < 0.99
    assert any("mask agreement" in p for p in bad.problems)
    ok = verify_models(models["plain"], models["nudged"])
    assert ok.ok, ok.summary()
    assert 0 < ok.report.max_abs < 1e-3


def test_plain_vs_fused_agree(models) -> None:
    res = verify_models(models["plain"], models["fused"])
    assert res.ok, res.summary()
    assert res.report.mask_agreement >= 0.995 and res.report.max_abs < 1e-3


def test_int8_onnxruntime_is_measured(models) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    cases = ct_small_cases()
    spec = ModelSpec.for_input_size(SIZE)
    x, _ = prepare_batch([c.slice_hu for c in cases], [c.points for c in cases], spec)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"input": x[i : i + 1]} for i in range(len(x))])

        def get_next(self):
            return next(self.items, None)

    int8 = models["dir"] / "int8.onnx"
    quantize_static(str(models["plain"]), str(int8), Reader(), quant_format=QuantFormat.QDQ)
    res = verify_models(models["plain"], int8, atol=1.0, min_mask_agreement=0.5)
    assert res.ok, res.summary()
    assert 0 < res.report.max_abs < 1.0
    assert res.report.mask_agreement > 0.8


def test_cli_identical_passes_perturbed_fails(models) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["verify", str(models["plain"]), str(models["plain"])])
    assert res.exit_code == 0, res.output
    assert "PASS" in res.output and "max |dprobability| 0 " in res.output
    res = runner.invoke(app, ["verify", str(models["plain"]), str(models["shifted"])])
    assert res.exit_code == 1, res.output
    assert "FAIL" in res.output and "mask agreement" in res.output
    res = runner.invoke(
        app,
        ["verify", str(models["plain"]), str(models["shifted"]), "--atol", "1", "--min-mask-agreement", "0"],
    )
    assert res.exit_code == 0, res.output


def test_cli_npy_input_with_points_csv(models, tmp_path) -> None:
    npy = tmp_path / "slices.npy"
    np.save(npy, np.stack([read_slice(ct_small_path())] * 2).astype(np.int16))
    csv = tmp_path / "points.csv"
    header = "slice_index,label,left_x,left_y,right_x,right_y,top_x,top_y,bottom_x,bottom_y"
    rows = [
        f"{k},{name}," + ",".join(str(v) for p in CT_SMALL_POINT_SETS[name] for v in p)
        for k, name in ((0, "spinal_canal"), (1, "vertebra"), (1, "tiny_spot"))
    ]
    csv.write_text("\n".join([header, *rows]) + "\n")
    cases = load_cases(npy, csv)
    assert [c.name for c in cases] == ["slice 0:spinal_canal", "slice 1:vertebra", "slice 1:tiny_spot"]
    res = CliRunner().invoke(
        app, ["verify", str(models["plain"]), str(models["fused"]), "--input", str(npy), "--points", str(csv)]
    )
    assert res.exit_code == 0, res.output
    assert "3 objects" in res.output


def test_bad_inputs_exit_2(models, tmp_path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["verify", str(models["plain"]), str(tmp_path / "missing.onnx")])
    assert res.exit_code == 2 and "not found" in res.output
    plain = str(models["plain"])
    res = runner.invoke(app, ["verify", plain, plain, "--input", str(ct_small_path())])
    assert res.exit_code == 2 and "--points" in res.output
    with pytest.raises(InputError, match="--points"):
        load_cases(ct_small_path(), None)


def test_engine_without_tensorrt_exits_3_naming_the_extra(models, tmp_path) -> None:
    """An engine that cannot be loaded is a model/runtime failure (3), as in infer, bench, evaluate."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed")
    engine = tmp_path / "model.plan"
    engine.write_bytes(b"not an engine")
    res = CliRunner().invoke(app, ["verify", str(models["plain"]), str(engine)])
    assert res.exit_code == 3
    assert "cmdeploy[trt]" in res.output
