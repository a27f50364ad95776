"""Plain ONNX export: graph shape, model card, built-in parity check, dynamic batch, CLI."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from typer.testing import CliRunner  # noqa: E402

from cmdeploy import __version__  # noqa: E402
from cmdeploy.export import onnx_export  # noqa: E402
from cmdeploy.export.onnx_export import export_onnx, fuse_batchnorm  # noqa: E402
from cmdeploy.export.parity import ParityError, ct_small_cases  # noqa: E402
from cmdeploy.preprocess import prepare_batch  # noqa: E402
from cmdeploy.spec import ModelSpec  # noqa: E402
from cmdeploy.train.checkpoint import Checkpoint, file_sha256  # noqa: E402
from cmdeploy.train.model import build_model, make_config  # noqa: E402

torch.set_num_threads(1)
SIZE = 64


def tiny_checkpoint(path: Path, *, guidance: str = "cm", seed: int = 0) -> Checkpoint:
    """Random ResNet-18 (width 8, 64 px) with random BN statistics and a classifier calibrated so
    that about half of the CT_small crop pixels are foreground (masks with real boundaries)."""
    torch.manual_seed(seed)
    spec = ModelSpec.for_input_size(SIZE, guidance=guidance)
    cfg = make_config("compact", spec.num_channels, depth=18, base_width=8, input_size=SIZE, psp_channels=16)
    model = build_model(cfg).eval()
    cases = ct_small_cases()
    x, _ = prepare_batch([c.slice_hu for c in cases], [c.points for c in cases], spec)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        torch.nn.init.normal_(model.head.classifier.weight, std=0.5)
        logits = model(torch.from_numpy(x)).numpy()
        model.head.classifier.bias -= float(np.median(logits))
    ckpt = Checkpoint.from_model(
        model,
        spec,
        train_info={"data": "/data/ct-organs", "split": {"train": ["a"], "val": ["b"]}, "history": [{}]},
        metrics={"val_dice": 0.8125},
        epoch=7,
    )
    ckpt.save(path)
    return ckpt


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Checkpoint, object]:
    d = tmp_path_factory.mktemp("plain")
    ckpt_path = d / "tiny.pt"
    ckpt = tiny_checkpoint(ckpt_path)
    out = d / "tiny.onnx"
    result = export_onnx(ckpt_path, out)
    return ckpt_path, out, ckpt, result


def test_graph_is_checked_single_file_with_dynamic_batch_io(exported) -> None:
    _, out, ckpt, result = exported
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny.onnx", "tiny.pt"]  # no external data
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in model.graph.initializer)
    (inp,) = model.graph.input
    (outp,) = model.graph.output
    assert (inp.name, outp.name) == ("input", "logits")
    dims_in = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    dims_out = [d.dim_param or d.dim_value for d in outp.type.tensor_type.shape.dim]
    assert dims_in == ["batch", 2, SIZE, SIZE]
    assert dims_out == ["batch", 1, SIZE, SIZE]
    assert result.file_bytes == out.stat().st_size


def test_graph_is_folded_and_small(exported) -> None:
    _, out, _, result = exported
    model = onnx.load(str(out))
    ops = [n.op_type for n in model.graph.node]
    for op in ("BatchNormalization", "Gather", "Shape", "Constant", "Identity", "Resize", "Dropout"):
        assert op not in ops, op
    # ResNet-18: 20 backbone convs, 4 PSP branch convs, fuse + classifier = 26 convs
    assert ops.count("Conv") == 26
    assert ops.count("MatMul") == 18  # pooling and resize as constant matrices
    assert len(ops) == result.node_count <= 80
    assert result.batchnorm_fused == 25


def test_model_card_round_trip(exported) -> None:
    ckpt_path, out, ckpt, _ = exported
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert ModelSpec.from_metadata(meta) == ckpt.spec
    assert meta["cmdeploy.checkpoint_sha256"] == file_sha256(ckpt_path)
    assert json.loads(meta["cmdeploy.model_config"]) == ckpt.model_config.to_dict()
    assert json.loads(meta["cmdeploy.metrics"]) == {"val_dice": 0.8125}
    assert float(meta["cmdeploy.validation_dice"]) == pytest.approx(0.8125)
    assert json.loads(meta["cmdeploy.training_data"]) == {
        "data": "/data/ct-organs",
        "split": {"train": ["a"], "val": ["b"]},
    }
    assert json.loads(meta["cmdeploy.train"])["history_epochs"] == 1
    assert meta["cmdeploy.version"] == __version__
    assert meta["cmdeploy.graph"] == "plain"
    assert meta["cmdeploy.epoch"] == "7"
    assert datetime.fromisoformat(meta["cmdeploy.export_date"]).tzinfo is not None


def test_parity_numbers_on_real_slices(exported) -> None:
    _, _, _, result = exported
    rep = result.parity
    assert rep is not None and rep.quantity == "logit"
    assert rep.n_items >= len(ct_small_cases())
    assert rep.max_abs < 1e-4
    assert rep.mask_mismatch <= 1e-3
    assert 0.2 < rep.foreground < 0.8  # the calibrated model draws real boundaries


@pytest.mark.parametrize("batch", [1, 5])
def test_dynamic_batch_matches_torch(exported, batch: int) -> None:
    _, out, ckpt, _ = exported
    cases = (ct_small_cases() * 2)[:batch]
    x, _ = prepare_batch([c.slice_hu for c in cases], [c.points for c in cases], ckpt.spec)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"input": x})
    with torch.no_grad():
        want = ckpt.build_model()(torch.from_numpy(x)).numpy()
    assert got.shape == (batch, 1, SIZE, SIZE)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_fuse_batchnorm_keeps_outputs() -> None:
    torch.manual_seed(1)
    cfg = make_config("compact", 2, depth=18, base_width=8, input_size=32, psp_channels=8)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.running_mean.uniform_(-1, 1)
    fused, n = fuse_batchnorm(model)
    assert n == 25
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # original untouched
    x = torch.randn(2, 2, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), atol=1e-4, rtol=1e-4)


def test_parity_failure_raises_and_writes_nothing(exported, tmp_path, monkeypatch) -> None:
    ckpt_path = exported[0]
    real = onnx_export.fuse_batchnorm

    def broken(model):
        fused, n = real(model)
        with torch.no_grad():
            fused.head.classifier.bias += 0.01  # a small drift torch would not see
        return fused, n

    monkeypatch.setattr(onnx_export, "fuse_batchnorm", broken)
    out = tmp_path / "bad.onnx"
    with pytest.raises(ParityError, match="logit"):
        export_onnx(ckpt_path, out, parity_slices=ct_small_cases()[:2])
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_cli_export_prints_numbers_and_fails_on_parity(exported, tmp_path, monkeypatch) -> None:
    from cmdeploy.cli import app

    ckpt_path = exported[0]
    out = tmp_path / "cli.onnx"
    res = CliRunner().invoke(app, ["export", "--checkpoint", str(ckpt_path), "--output", str(out)])
    assert res.exit_code == 0, res.output
    assert "nodes: " in res.output and "parity:" in res.output and "MB" in res.output
    assert out.is_file()

    monkeypatch.setattr(onnx_export, "run_onnx", lambda model, feeds: {"logits": feeds["input"][:, :1] * 0})
    res = CliRunner().invoke(
        app, ["export", "--checkpoint", str(ckpt_path), "--output", str(tmp_path / "x.onnx")]
    )
    assert res.exit_code == 1
    assert "parity check failed" in res.output
    assert not (tmp_path / "x.onnx").exists()


def test_cli_fp16_copy_and_triton_repository(exported, tmp_path) -> None:
    from cmdeploy.cli import app

    out = tmp_path / "m.onnx"
    args = ["export", "--checkpoint", str(exported[0])]
    res = CliRunner().invoke(app, [*args, "--output", str(out), "--fp16"])
    assert res.exit_code == 0, res.output
    assert "FP16 vs FP32" in res.output and "PASS" in res.output
    fp16 = onnx.load(str(tmp_path / "m.fp16.onnx"))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in fp16.graph.initializer)

    # the Triton repository serves the fused model: refused without --fused, before any work
    args = [*args, "--triton-repo", str(tmp_path / "repo")]
    res = CliRunner().invoke(app, [*args, "--output", str(tmp_path / "p.onnx")])
    assert res.exit_code == 2 and "add --fused" in res.output
    assert not (tmp_path / "p.onnx").exists() and not (tmp_path / "repo").exists()
    fused = tmp_path / "f.onnx"
    res = CliRunner().invoke(app, [*args, "--output", str(fused), "--fused", "--model-name", "tiny"])
    assert res.exit_code == 0, res.output
    text = (tmp_path / "repo" / "tiny" / "config.pbtxt").read_text()
    assert 'name: "slices"' in text and 'name: "points"' in text and 'name: "probabilities"' in text
    assert (tmp_path / "repo" / "tiny" / "1" / "model.onnx").read_bytes() == fused.read_bytes()
    # from an existing ONNX: only a fused one
    repo2 = ["--triton-repo", str(tmp_path / "r2")]
    res = CliRunner().invoke(app, ["export", "--onnx", str(exported[1]), *repo2])
    assert res.exit_code == 2 and "export it with --fused" in res.output
    assert not (tmp_path / "r2").exists()
    res = CliRunner().invoke(app, ["export", "--onnx", str(fused), *repo2])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r2" / "cmdeploy" / "config.pbtxt").is_file()


def test_cli_engine_without_tensorrt_names_the_extra(exported, tmp_path) -> None:
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed")
    from cmdeploy.cli import app

    res = CliRunner().invoke(
        app,
        [
            "export", "--checkpoint", str(exported[0]), "--output", str(tmp_path / "m.onnx"),
            "--engine", str(tmp_path / "m.plan"),
        ],
    )
    assert res.exit_code != 0
    assert "cmdeploy[trt]" in res.output
    assert not (tmp_path / "m.onnx").exists()


def test_cli_rejects_bad_options(exported, tmp_path) -> None:
    from cmdeploy.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["export", "--checkpoint", str(tmp_path / "no.pt"), "--output", "m.onnx"])
    assert res.exit_code == 2 and "not found" in res.output
    res = runner.invoke(
        app,
        ["export", "--checkpoint", str(exported[0]), "--output", str(tmp_path / "m.onnx"),
         "--precision", "fp8"],
    )
    assert res.exit_code == 2 and "--precision" in res.output
    res = runner.invoke(
        app,
        ["export", "--checkpoint", str(exported[0]), "--output", str(tmp_path / "m.onnx"),
         "--postprocess", "holes"],
    )
    assert res.exit_code == 2 and "--postprocess" in res.output and not (tmp_path / "m.onnx").exists()


def test_cli_stores_run_time_options_in_the_model(exported, tmp_path) -> None:
    from cmdeploy.cli import app
    from cmdeploy.segmenter import Segmenter

    out = tmp_path / "tuned.onnx"
    res = CliRunner().invoke(
        app, ["export", "--checkpoint", str(exported[0]), "--output", str(out), "--threshold", "0.4",
              "--postprocess", "clicked"],
    )
    assert res.exit_code == 0, res.output
    spec = Segmenter.load(out).spec
    assert spec.threshold == 0.4 and spec.postprocess == "clicked"
    assert Segmenter.load(exported[1]).spec.threshold == 0.5  # the checkpoint itself is unchanged
    assert Checkpoint.load(exported[0]).spec.postprocess == "none"


DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "cmdeploy" / "models" / "cmdeploy-default.onnx"


@pytest.mark.skipif(not DEFAULT_MODEL.is_file(), reason="no shipped default model yet")
def test_shipped_default_model_is_a_clean_plain_export() -> None:
    model = onnx.load(str(DEFAULT_MODEL))
    onnx.checker.check_model(model, full_check=True)
    meta = {p.key: p.value for p in model.metadata_props}
    spec = ModelSpec.from_metadata(meta)
    assert meta.get("cmdeploy.checkpoint_sha256")
    ops = [n.op_type for n in model.graph.node]
    assert "BatchNormalization" not in ops and "Gather" not in ops
    s = spec.input_size
    x, _ = prepare_batch([c.slice_hu for c in ct_small_cases()], [c.points for c in ct_small_cases()], spec)
    sess = ort.InferenceSession(str(DEFAULT_MODEL), providers=["CPUExecutionProvider"])
    (logits,) = sess.run(None, {sess.get_inputs()[0].name: x})
    assert logits.shape == (len(x), 1, s, s) and np.isfinite(logits).all()
