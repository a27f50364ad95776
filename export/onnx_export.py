"""Checkpoint -> plain ONNX: ``input`` (N, C, S, S) float32 -> ``logits`` (N, 1, S, S).

Steps of :func:`export_onnx`:

1. load the :class:`~cmdeploy.train.checkpoint.Checkpoint`, build the model in eval mode,
2. fold every BatchNorm into the conv before it, in torch (``fuse_conv_bn_eval``),
3. ``torch.onnx.export(dynamo=False)``: the TorchScript exporter gives the cleaner graph for this
   network (the dynamo exporter ends with the same nodes after folding, is much slower and only
   emits opset >= 18, converting down; docs/results.md); batch axis dynamic, C and S fixed,
4. constant folding with onnx-graphsurgeon (``fold_constants().cleanup().toposort()``): the
   head's pooling/resize matrices become initializers, no ``Constant``/``Identity`` nodes remain,
5. the model card in ``metadata_props`` (:func:`model_card`), ``onnx.checker`` (full check),
6. parity: torch vs onnxruntime on real preprocessed slices (:mod:`cmdeploy.export.parity`);
   the export fails (:class:`~cmdeploy.export.parity.ParityError`, nothing written) when
   max |dlogit| > ``atol`` or the masks differ on more than ``max_mask_mismatch`` of the pixels,
7. one self-contained file, written to a temp name and renamed.

The channel order of ``input`` is ``spec.channels`` (image, then guidance).
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from cmdeploy import __version__
from cmdeploy.export.parity import ParityCase, ParityReport, compare_outputs, default_cases
from cmdeploy.hashing import file_sha256
from cmdeploy.writers.atomic import atomic_path

DEFAULT_OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
PARITY_ATOL = 1e-3  # max |dlogit|
PARITY_MAX_MASK_MISMATCH = 1e-3  # fraction of pixels (0.1 %)
GRAPH_KEY = "cmdeploy.graph"  # "plain" or "fused"


@dataclass
class ExportResult:
    """What an export wrote and how it checked out.

    Attributes:
        path: the ONNX file.
        graph: ``"plain"`` or ``"fused"``.
        opset: ONNX opset of the default domain.
        node_count: nodes in the main graph.
        op_counts: nodes per operator type.
        file_bytes: size of the file.
        checkpoint_sha256: SHA-256 of the source checkpoint.
        parity: the parity check's numbers (None when skipped).
        batchnorm_fused: conv+BN pairs folded in torch before export.
        metadata: the metadata_props written.
    """

    path: Path
    graph: str
    opset: int
    node_count: int
    op_counts: dict[str, int]
    file_bytes: int
    checkpoint_sha256: str
    parity: ParityReport | None = None
    batchnorm_fused: int = 0
    metadata: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        ops = ", ".join(f"{k} {v}" for k, v in sorted(self.op_counts.items(), key=lambda kv: -kv[1]))
        lines = [
            f"wrote {self.path} ({self.graph} graph, opset {self.opset}, "
            f"{self.file_bytes / 1e6:.2f} MB)",
            f"nodes: {self.node_count} ({ops})",
        ]
        if self.parity is not None:
            lines.append(f"parity: {self.parity.summary()}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------ torch side
def fuse_batchnorm(model: Any) -> tuple[Any, int]:
    """A deep copy of ``model`` (eval) with each BatchNorm2d folded into the Conv2d feeding it.

    Pairs are found structurally: adjacent ``Conv2d, BatchNorm2d`` in an ``nn.Sequential``, and
    sibling attributes ``conv<k>`` / ``bn<k>`` (``conv`` / ``bn``), which is how ResNet-PSP applies
    them (``bn(conv(x))``). The BN becomes ``nn.Identity``. Returns (model, pairs fused); the
    export's parity check guards the assumption.
    """
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    fused = copy.deepcopy(model).eval()
    count = 0

    def fits(conv: Any, bn: Any) -> bool:
        return (
            isinstance(conv, nn.Conv2d)
            and isinstance(bn, nn.BatchNorm2d)
            and bn.num_features == conv.out_channels
            and bn.track_running_stats
        )

    for module in list(fused.modules()):
        if isinstance(module, nn.Sequential):
            names = list(module._modules)
            for a, b in zip(names, names[1:], strict=False):
                conv, bn = module._modules[a], module._modules[b]
                if fits(conv, bn):
                    module._modules[a] = fuse_conv_bn_eval(conv, bn)
                    module._modules[b] = nn.Identity()
                    count += 1
            continue
        for name, child in list(module.named_children()):
            if not (isinstance(child, nn.BatchNorm2d) and name.startswith("bn")):
                continue
            conv_name = "conv" + name[2:]
            conv = getattr(module, conv_name, None)
            if fits(conv, child):
                setattr(module, conv_name, fuse_conv_bn_eval(conv, child))
                setattr(module, name, nn.Identity())
                count += 1
    return fused, count


def load_checkpoint(
    checkpoint_path: str | Path, runtime_options: dict[str, Any] | None = None
) -> tuple[Any, Any, str]:
    """(Checkpoint, eval-mode model, checkpoint SHA-256) for a checkpoint file.

    ``runtime_options`` replaces run-time fields of the checkpoint's spec that do not change the
    network (``threshold``, ``postprocess``), e.g. as chosen by ``benchmarks/tune_inference.py``.
    """
    import dataclasses

    from cmdeploy.train.checkpoint import Checkpoint

    ckpt = Checkpoint.load(checkpoint_path)
    options = {k: v for k, v in (runtime_options or {}).items() if v is not None}
    unknown = set(options) - set(RUNTIME_OPTIONS)
    if unknown:
        raise ValueError(f"not run-time spec options: {sorted(unknown)} (allowed: {RUNTIME_OPTIONS})")
    if options:
        ckpt = dataclasses.replace(ckpt, spec=dataclasses.replace(ckpt.spec, **options))
    return ckpt, ckpt.build_model(), file_sha256(checkpoint_path)


RUNTIME_OPTIONS = ("threshold", "postprocess")


def _json(value: Any) -> str:
    def default(o: Any) -> Any:
        if hasattr(o, "tolist"):
            return o.tolist()
        return str(o)

    return json.dumps(value, sort_keys=True, default=default)


def model_card(ckpt: Any, checkpoint_sha256: str, graph: str) -> dict[str, str]:
    """ONNX ``metadata_props`` of an exported model.

    ``ModelSpec.to_metadata()`` plus: ``cmdeploy.graph`` (plain/fused), ``cmdeploy.model_config``,
    ``cmdeploy.training_data`` (train_info ``data`` and ``split``), ``cmdeploy.train`` (train info
    without the per-epoch history), ``cmdeploy.metrics``, ``cmdeploy.validation_dice`` (when the
    metrics have ``val_dice``), ``cmdeploy.epoch``, ``cmdeploy.checkpoint_sha256``,
    ``cmdeploy.version`` and ``cmdeploy.export_date`` (ISO 8601 UTC). JSON values are sorted-key JSON.
    """
    import torch

    info = dict(ckpt.train_info)
    history = info.pop("history", None)
    if history is not None:
        info["history_epochs"] = len(history)
    meta = dict(ckpt.spec.to_metadata())
    meta.update(
        {
            GRAPH_KEY: graph,
            "cmdeploy.model_config": _json(ckpt.model_config.to_dict()),
            "cmdeploy.training_data": _json(
                {k: ckpt.train_info[k] for k in ("data", "split") if k in ckpt.train_info}
            ),
            "cmdeploy.train": _json(info),
            "cmdeploy.metrics": _json(ckpt.metrics),
            "cmdeploy.epoch": "" if ckpt.epoch is None else str(ckpt.epoch),
            "cmdeploy.checkpoint_sha256": checkpoint_sha256,
            "cmdeploy.version": __version__,
            "cmdeploy.export_date": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
            "cmdeploy.exporter": f"torch {torch.__version__} torch.onnx.export(dynamo=False)",
        }
    )
    dice = ckpt.metrics.get("val_dice")
    if isinstance(dice, (int, float)):
        meta["cmdeploy.validation_dice"] = f"{float(dice):.6f}"
    recipe = ckpt.metrics.get("validated_by")
    if isinstance(recipe, dict):  # a final model trained on every case: say whose Dice that is
        last = ckpt.metrics.get("last_epoch", {})
        meta["cmdeploy.validation_source"] = (
            f"recipe run validated on {recipe.get('split', {}).get('val')} (best epoch "
            f"{ckpt.metrics.get('epoch')}; its last epoch: {last.get('val_dice', float('nan')):.6f}); "
            "this model is the same recipe trained on all cases, the validation case included"
        )
    return meta


# ------------------------------------------------------------------------------ onnx side
def fold_and_clean(model: Any) -> Any:
    """Constant-fold with onnx-graphsurgeon, drop dead nodes, sort; returns a new ModelProto."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph.fold_constants().cleanup().toposort()
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    del out.opset_import[:]
    out.opset_import.extend(model.opset_import)
    return out


def set_metadata(model: Any, metadata: dict[str, str]) -> None:
    """Replace the model's ``metadata_props`` by ``metadata`` (string keys and values)."""
    del model.metadata_props[:]
    for key in sorted(metadata):
        entry = model.metadata_props.add()
        entry.key = key
        entry.value = str(metadata[key])


def op_counts(model: Any) -> dict[str, int]:
    """Node count per operator type of the main graph."""
    return dict(Counter(n.op_type for n in model.graph.node))


def save_model(model: Any, path: str | Path) -> int:
    """Check (``onnx.checker`` full check) and write ``model`` as one file, atomically; returns bytes."""
    import onnx

    onnx.checker.check_model(model, full_check=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp), save_as_external_data=False)
    return path.stat().st_size


def traced_model(
    trace: Callable[[Path], object],
    ckpt: Any,
    checkpoint_sha256: str,
    graph: str,
    doc_string: str,
    extra_metadata: dict[str, str] | None = None,
) -> tuple[Any, dict[str, str]]:
    """The ONNX side of an export, shared by the plain and the fused graph.

    ``trace(path)`` writes the raw ONNX to a temporary ``path``; the model is loaded,
    constant-folded (:func:`fold_and_clean`), given ``doc_string`` and the model card
    (:func:`model_card` for ``graph``, plus ``extra_metadata``) and passed through ``onnx.checker``
    (full check). Returns (ModelProto, metadata written).
    """
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        raw_path = Path(tmp) / f"{graph}.onnx"
        trace(raw_path)
        proto = onnx.load(str(raw_path))
    proto = fold_and_clean(proto)
    proto.doc_string = doc_string
    meta = model_card(ckpt, checkpoint_sha256, graph)
    meta.update(extra_metadata or {})
    set_metadata(proto, meta)
    onnx.checker.check_model(proto, full_check=True)
    return proto, meta


def parity_cases(parity_slices: Sequence[ParityCase] | None) -> list[ParityCase]:
    """``parity_slices`` as a list, or :func:`~cmdeploy.export.parity.default_cases` when None.

    Raises ``ValueError`` when there is no case to check.
    """
    cases = default_cases() if parity_slices is None else list(parity_slices)
    if not cases:
        raise ValueError("parity check needs at least one (slice, points) case")
    return cases


def write_export(
    proto: Any,
    output_path: str | Path,
    *,
    graph: str,
    opset: int,
    checkpoint_sha256: str,
    parity: ParityReport | None,
    batchnorm_fused: int,
    metadata: dict[str, str],
) -> ExportResult:
    """Write ``proto`` (:func:`save_model`) and describe it as an :class:`ExportResult`."""
    size = save_model(proto, output_path)
    return ExportResult(
        path=Path(output_path),
        graph=graph,
        opset=opset,
        node_count=len(proto.graph.node),
        op_counts=op_counts(proto),
        file_bytes=size,
        checkpoint_sha256=checkpoint_sha256,
        parity=parity,
        batchnorm_fused=batchnorm_fused,
        metadata=metadata,
    )


def run_onnx(model: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run an in-memory ModelProto with onnxruntime on CPU; returns {output name: array}."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(
        model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feeds), strict=True))


def logit(p: float) -> float:
    """Inverse sigmoid of a probability threshold."""
    return math.log(p / (1.0 - p))


def plain_parity(
    torch_model: Any,
    run_onnx_logits: Callable[[np.ndarray], np.ndarray],
    spec: Any,
    cases: Sequence[ParityCase],
    *,
    batch: int = 8,
) -> ParityReport:
    """torch vs ONNX logits on ``prepare_batch`` inputs of ``cases``; masks at the spec threshold."""
    import torch

    from cmdeploy.preprocess import prepare_batch

    x, _ = prepare_batch([c.slice_hu for c in cases], [c.points for c in cases], spec)
    ref, test = [], []
    with torch.no_grad():
        for a in range(0, len(x), batch):
            chunk = x[a : a + batch]
            ref.append(torch_model(torch.from_numpy(chunk)).numpy())
            test.append(run_onnx_logits(chunk))
    return compare_outputs(
        list(np.concatenate(ref)[:, 0]),
        list(np.concatenate(test)[:, 0]),
        logit(spec.threshold),
        quantity="logit",
    )


def export_onnx(
    checkpoint_path: str | Path,
    output_path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    parity_slices: Sequence[ParityCase] | None = None,
    check_parity: bool = True,
    atol: float = PARITY_ATOL,
    max_mask_mismatch: float = PARITY_MAX_MASK_MISMATCH,
    runtime_options: dict[str, Any] | None = None,
) -> ExportResult:
    """Export a checkpoint to a plain ONNX model (see the module docstring).

    Args:
        checkpoint_path: a ``cmdeploy.train`` checkpoint.
        output_path: the ``.onnx`` file to write.
        opset: ONNX opset (>= 13).
        parity_slices: real (slice, points) cases for the parity check; None = CT_small.dcm point
            sets plus shared-data objects when present (:func:`cmdeploy.export.parity.default_cases`).
        check_parity: run the parity check (on by default).
        atol: largest allowed |torch logit - onnxruntime logit|.
        max_mask_mismatch: largest allowed fraction of crop pixels whose masks differ.
        runtime_options: spec fields to replace in the exported model (:func:`load_checkpoint`).

    Raises:
        ParityError: the exported model disagrees with torch (nothing is written).
    """
    import torch

    if opset < 13:
        raise ValueError(f"opset must be >= 13, got {opset}")
    ckpt, model, sha = load_checkpoint(checkpoint_path, runtime_options)
    spec = ckpt.spec
    fused, n_fused = fuse_batchnorm(model)
    s, c = spec.input_size, spec.num_channels

    def trace(raw_path: Path) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                fused,
                (torch.zeros(2, c, s, s),),
                str(raw_path),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=opset,
                do_constant_folding=True,
                training=torch.onnx.TrainingMode.EVAL,
                dynamo=False,
            )

    proto, meta = traced_model(
        trace,
        ckpt,
        sha,
        "plain",
        f"cmdeploy plain model: {INPUT_NAME} (N, {c}, {s}, {s}) float32, channels "
        f"{','.join(spec.channels)} -> {OUTPUT_NAME} (N, 1, {s}, {s}) foreground logits",
    )
    bn_left = op_counts(proto).get("BatchNormalization", 0)
    if bn_left:
        raise RuntimeError(f"{bn_left} BatchNormalization nodes were not folded into convolutions")

    report = None
    if check_parity:
        report = plain_parity(
            model,
            lambda x: run_onnx(proto, {INPUT_NAME: x})[OUTPUT_NAME],
            spec,
            parity_cases(parity_slices),
        )
        report.check(atol=atol, max_mask_mismatch=max_mask_mismatch, what="torch vs onnxruntime parity")
    return write_export(
        proto,
        output_path,
        graph="plain",
        opset=opset,
        checkpoint_sha256=sha,
        parity=report,
        batchnorm_fused=n_fused,
        metadata=meta,
    )


__all__ = [
    "DEFAULT_OPSET",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "ExportResult",
    "export_onnx",
    "fold_and_clean",
    "fuse_batchnorm",
    "load_checkpoint",
    "logit",
    "model_card",
    "op_counts",
    "parity_cases",
    "plain_parity",
    "run_onnx",
    "save_model",
    "set_metadata",
    "traced_model",
    "write_export",
]
