"""The INT8 accuracy gate and the layer-sensitivity search behind ``--auto-exclude``.

The gate scores FP32 and INT8 the way the product is used: each held-out object's crop is
prepared (:func:`cmdeploy.preprocess.prepare_batch`), the model's logits go through the sigmoid,
are pasted back into the slice (:func:`cmdeploy.preprocess.probabilities_to_slice`) and thresholded
at ``spec.threshold``; Dice is taken against the object's reference mask. Scores are in Dice
points (percent). The INT8 model passes when ``mean FP32 Dice - mean INT8 Dice <= max_drop``.

Sensitivity (:func:`conv_sensitivity`): run the float model and the QDQ model on a few crops and
read, for every quantized tensor, the signal-to-quantization-noise ratio ``SQNR = 10 log10(|f|^2
/ |f - q|^2)`` of the QDQ model's dequantized value ``q`` against the float value ``f``
(accumulated error, like onnxruntime's ``qdq_loss_debug``). A conv's sensitivity is the SQNR it
loses between its quantized input and its quantized output: the dB of noise it adds. The search
excludes the top 1, 2, 4, 8 convs in that order and re-quantizes (the ranges are reused) until
the gate passes.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from cmdeploy.calibration import graph
from cmdeploy.calibration.quantize import (
    PreparedModel,
    RangeCache,
    Recipe,
    calibrate_ranges,
    int8_metadata,
    prepare,
    qdq_summary,
    quantize,
    save_model,
    set_metadata,
    write_trt_calibration_cache,
)
from cmdeploy.calibration.reader import prepare_objects
from cmdeploy.calibration.slices import DataSplit, SliceObject, fingerprint
from cmdeploy.evaluation.metrics import dice
from cmdeploy.preprocess import prepare_batch, probabilities_to_slice, sigmoid
from cmdeploy.spec import ModelSpec

DEFAULT_MAX_DROP = 1.0  # Dice points
SEARCH_STEPS = (1, 2, 4, 8)
SENSITIVITY_OBJECTS = 8
ModelLike = onnx.ModelProto | str | Path


def make_session(
    model: ModelLike, *, threads: int | None = None, fake_quant: bool = False
) -> ort.InferenceSession:
    """A CPU onnxruntime session for a ModelProto or a path (``threads`` intra-op threads).

    ``fake_quant``: run Q/DQ pairs as float quantize-dequantize instead of fusing them into
    onnxruntime's integer kernels. That is what an int32-accumulating engine (TensorRT) computes;
    onnxruntime's x86 kernels without VNNI add products in int16 and would score the TensorRT
    target's full-range int8 weights lower than TensorRT runs them.
    """
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if fake_quant:
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
    if threads:
        opts.intra_op_num_threads = threads
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, sess_options=opts, providers=["CPUExecutionProvider"])


def evaluate_dice(
    session: ort.InferenceSession,
    objects: Sequence[SliceObject],
    spec: ModelSpec,
    *,
    batch_size: int = 16,
) -> np.ndarray:
    """Per-object Dice (fraction) of a plain model's masks after paste-back vs reference masks."""
    name = session.get_inputs()[0].name
    out = np.empty(len(objects), dtype=np.float64)
    for a in range(0, len(objects), batch_size):
        chunk = objects[a : a + batch_size]
        x, transforms = prepare_batch([o.slice_hu for o in chunk], [o.points for o in chunk], spec)
        probs = sigmoid(session.run(None, {name: x})[0][:, 0])
        for i, (o, t) in enumerate(zip(chunk, transforms, strict=True)):
            full = probabilities_to_slice(probs[i], t, o.slice_hu.shape)
            out[a + i] = dice(full > spec.threshold, o.mask)
    return out


@dataclass
class Attempt:
    """One quantization tried by the gate: its excluded convs and mean INT8 Dice (points)."""

    excluded: list[str]
    int8_mean: float
    drop: float
    passed: bool


@dataclass
class GateReport:
    """FP32 vs INT8 Dice on the held-out objects.

    Attributes:
        cases: case name per object.
        fp32: per-object FP32 Dice (fraction).
        int8: per-object Dice of the chosen (last tried) INT8 model (fraction).
        max_drop: allowed drop of the mean, Dice points.
        attempts: every quantization tried, in order.
    """

    cases: list[str]
    fp32: np.ndarray
    int8: np.ndarray
    max_drop: float
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def fp32_mean(self) -> float:
        return float(self.fp32.mean() * 100.0)

    @property
    def int8_mean(self) -> float:
        return float(self.int8.mean() * 100.0)

    @property
    def drop(self) -> float:
        return self.fp32_mean - self.int8_mean

    @property
    def passed(self) -> bool:
        return bool(self.drop <= self.max_drop)

    def table(self) -> str:
        """A plain-text report: per-case and overall Dice, attempts, verdict."""
        rows = [f"{'case':<24} {'objects':>7} {'FP32':>7} {'INT8':>7} {'drop':>6}"]
        cases = np.asarray(self.cases)
        for c in dict.fromkeys(self.cases):
            sel = cases == c
            f, q = self.fp32[sel].mean() * 100, self.int8[sel].mean() * 100
            rows.append(f"{c:<24} {int(sel.sum()):>7} {f:>7.2f} {q:>7.2f} {f - q:>6.2f}")
        rows.append(
            f"{'all':<24} {len(self.fp32):>7} {self.fp32_mean:>7.2f} {self.int8_mean:>7.2f} {self.drop:>6.2f}"
        )
        lines = ["INT8 accuracy gate: mean Dice (%) after paste-back on held-out objects", *rows]
        if len(self.attempts) > 1:
            lines.append("attempts (excluded convs -> INT8 Dice, drop):")
            for a in self.attempts:
                what = ", ".join(a.excluded) if a.excluded else "none"
                lines.append(f"  [{what}] -> {a.int8_mean:.2f}, {a.drop:.2f}{' PASS' if a.passed else ''}")
        verdict = "PASS" if self.passed else "FAIL"
        lines.append(f"{verdict}: drop {self.drop:.2f} Dice points, allowed {self.max_drop:.2f}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------ sensitivity
def _with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    for n in names:
        if n not in have:
            out.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
    return out


def dequantized_tensors(qdq: onnx.ModelProto) -> dict[str, str]:
    """{float tensor name: its DequantizeLinear output} for every quantized activation."""
    inits = {i.name for i in qdq.graph.initializer}
    producer = {o: n for n in qdq.graph.node for o in n.output}
    out = {}
    for n in qdq.graph.node:
        if n.op_type != "DequantizeLinear" or n.input[0] in inits:
            continue
        q = producer.get(n.input[0])
        if q is not None and q.op_type == "QuantizeLinear" and q.input[0] not in inits:
            out.setdefault(q.input[0], n.output[0])
    return out


def sqnr(f: np.ndarray, q: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when identical)."""
    noise = float(np.sum((f.astype(np.float64) - q) ** 2))
    signal = float(np.sum(f.astype(np.float64) ** 2))
    if noise == 0.0:
        return float("inf")
    return 10.0 * np.log10(max(signal, 1e-30) / noise)


def tensor_sqnr(float_model: onnx.ModelProto, qdq: onnx.ModelProto, x: np.ndarray) -> dict[str, float]:
    """SQNR (dB) of every quantized activation of ``qdq`` against ``float_model`` on input ``x``."""
    mapping = dequantized_tensors(qdq)
    float_names = set(mapping) - {i.name for i in float_model.graph.input}
    name = float_model.graph.input[0].name
    fs = make_session(_with_outputs(float_model, sorted(float_names)))
    qs = make_session(_with_outputs(qdq, sorted(mapping.values())))
    fo = dict(zip([o.name for o in fs.get_outputs()], fs.run(None, {name: x}), strict=True))
    fo[name] = x
    qo = dict(zip([o.name for o in qs.get_outputs()], qs.run(None, {name: x}), strict=True))
    return {t: sqnr(fo[t], qo[d]) for t, d in mapping.items() if t in fo}


def conv_sensitivity(
    float_model: onnx.ModelProto,
    qdq: onnx.ModelProto,
    x: np.ndarray,
    *,
    candidates: Sequence[str] | None = None,
) -> list[tuple[str, float]]:
    """Convs ranked by the SQNR (dB) lost between their quantized input and output, worst first.

    The output is the conv's own output if quantized, else the first quantized tensor down a
    chain of single-input elementwise ops (Relu, Clip).
    """
    snr = tensor_sqnr(float_model, qdq, x)
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in float_model.graph.node:
        for t in n.input:
            users.setdefault(t, []).append(n)
    allowed = None if candidates is None else set(candidates)
    ranked = []
    for n in float_model.graph.node:
        if n.op_type != "Conv" or (allowed is not None and n.name not in allowed):
            continue
        t = n.output[0]
        while t not in snr:
            nxt = users.get(t, [])
            if len(nxt) != 1 or nxt[0].op_type not in ("Relu", "Clip"):
                break
            t = nxt[0].output[0]
        if n.input[0] in snr and t in snr:
            ranked.append((n.name, snr[n.input[0]] - snr[t]))
    ranked.sort(key=lambda kv: -kv[1])
    return ranked


def run_gate(
    fp32_dice: np.ndarray,
    cases: Sequence[str],
    quantize_fn: Callable[[list[str]], onnx.ModelProto],
    score_fn: Callable[[onnx.ModelProto], np.ndarray],
    *,
    max_drop: float = DEFAULT_MAX_DROP,
    auto_exclude: bool = False,
    rank_fn: Callable[[onnx.ModelProto], list[str]] | None = None,
    base_exclude: Sequence[str] = (),
    progress: Callable[[str], None] | None = None,
) -> tuple[GateReport, onnx.ModelProto]:
    """Quantize, score, and (``auto_exclude``) retry with the most sensitive convs excluded.

    ``quantize_fn(exclude)`` returns an INT8 model, ``score_fn(model)`` its per-object Dice,
    ``rank_fn(model)`` conv names worst first. Returns the report and the last model tried (the
    passing one when the gate passed).
    """
    base = list(base_exclude)
    model = quantize_fn(base)
    scores = score_fn(model)
    report = GateReport(list(cases), np.asarray(fp32_dice, float), scores, max_drop)
    report.attempts.append(Attempt(base, report.int8_mean, report.drop, report.passed))
    if report.passed or not auto_exclude or rank_fn is None:
        return report, model
    ranked = [n for n in rank_fn(model) if n not in base]
    for k in SEARCH_STEPS:
        if k > len(ranked):
            break
        exclude = base + ranked[:k]
        if progress is not None:
            progress(f"auto-exclude: retrying with {k} most sensitive conv(s) in float")
        model = quantize_fn(exclude)
        report.int8 = score_fn(model)
        report.attempts.append(Attempt(exclude, report.int8_mean, report.drop, report.passed))
        if report.passed:
            break
    return report, model


def sensitivity_input(
    objects: Sequence[SliceObject], spec: ModelSpec, n: int = SENSITIVITY_OBJECTS
) -> np.ndarray:
    """The first ``n`` calibration objects as one network input batch."""
    return prepare_objects(list(objects)[:n], spec)


# ------------------------------------------------------------------------------ end to end
@dataclass
class CalibrationResult:
    """What :func:`calibrate_model` did.

    Attributes:
        report: the gate's report (FP32 vs INT8 Dice, attempts).
        model: the INT8 model of the last attempt, metadata set (also when the gate failed).
        output: the file written, or None (gate failed or no output asked for).
        trt_cache: the TensorRT 10 calibration cache written (trtexec/Polygraphy input, implicit
            INT8; cmdeploy never reads it), or None (CPU target, percentile ranges, gate failed).
        prepared: the prepared float model (rewrites, float tail, hashes).
        ranges_from_cache: the ranges came from the cache folder.
        summary: :func:`cmdeploy.calibration.quantize.qdq_summary` of the INT8 model.
    """

    report: GateReport
    model: onnx.ModelProto
    output: Path | None
    trt_cache: Path | None
    prepared: PreparedModel
    ranges_from_cache: bool
    summary: dict


def calibrate_model(
    model_path: str | Path,
    split: DataSplit,
    output: str | Path | None,
    *,
    recipe: Recipe,
    seed: int = 0,
    max_drop: float = DEFAULT_MAX_DROP,
    exclude: Sequence[str] = (),
    auto_exclude: bool = False,
    cache_dir: str | Path | None = None,
    batch_size: int = 8,
    threads: int | None = None,
    trt_version: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> CalibrationResult:
    """Calibrate, quantize and gate ``model_path``; write ``output`` only when the gate passes.

    With ``recipe.target == "tensorrt"`` (and MinMax or entropy ranges) a TensorRT 10 calibration
    cache is written next to the output (``<output stem>.calibration.cache``), for trtexec or
    Polygraphy; TensorRT 11 and cmdeploy's own build use the Q/DQ model only.
    """
    say = progress or (lambda _msg: None)
    with tempfile.TemporaryDirectory(prefix="cmdeploy-int8-") as tmp:
        prepared = prepare(model_path, recipe, tmp)
        spec = prepared.spec
        say(f"FP32 Dice on {len(split.evaluation)} held-out objects")
        fp32 = evaluate_dice(make_session(model_path, threads=threads), split.evaluation, spec)
        key = RangeCache.key(
            model=prepared.sha256,
            data=fingerprint(split.calibration),
            method=recipe.method,
            symmetric=recipe.symmetric_activations,
            seed=seed,
            num_slices=len(split.calibration),
            onnxruntime=ort.__version__,
        )
        cache = RangeCache(cache_dir) if cache_dir is not None else None
        ranges = cache.load(key) if cache is not None else None
        from_cache = ranges is not None
        if ranges is None:
            ranges = calibrate_ranges(
                prepared, split.calibration, recipe, batch_size=batch_size, progress=say
            )
            if cache is not None:
                cache.save(
                    key,
                    ranges,
                    {
                        "method": recipe.method,
                        "seed": seed,
                        "num_slices": len(split.calibration),
                        "calib_cases": split.calib_cases,
                        "fp32_sha256": prepared.source_sha256,
                    },
                )
        else:
            say(f"calibration ranges from cache {cache.path(key) if cache else ''}")
        quantizable = [n for n in graph.conv_names(prepared.model) if n not in prepared.tail]

        def quantize_fn(ex: list[str]) -> onnx.ModelProto:
            say(f"quantizing ({len(ex)} node(s) kept float besides the output tail)")
            return quantize(prepared, ranges, recipe, exclude=ex)

        def score_fn(m: onnx.ModelProto) -> np.ndarray:
            say("INT8 Dice on the held-out objects")
            session = make_session(m, threads=threads, fake_quant=recipe.target == "tensorrt")
            return evaluate_dice(session, split.evaluation, spec)

        def rank_fn(m: onnx.ModelProto) -> list[str]:
            say("layer sensitivity (SQNR lost per conv)")
            x = sensitivity_input(split.calibration, spec)
            return [n for n, _ in conv_sensitivity(prepared.model, m, x, candidates=quantizable)]

        report, model = run_gate(
            fp32,
            [o.case for o in split.evaluation],
            quantize_fn,
            score_fn,
            max_drop=max_drop,
            auto_exclude=auto_exclude,
            rank_fn=rank_fn,
            base_exclude=list(exclude),
            progress=say,
        )
        data = {
            "calib_cases": split.calib_cases,
            "eval_cases": split.eval_cases,
            "num_eval": len(split.evaluation),
            "seed": seed,
        }
        if split.note:
            data["note"] = split.note
        set_metadata(
            model,
            int8_metadata(
                prepared,
                recipe,
                num_slices=len(split.calibration),
                data=data,
                dice={"fp32": report.fp32_mean, "int8": report.int8_mean},
                excluded=report.attempts[-1].excluded,
            ),
        )
        written = trt = None
        if report.passed and output is not None:
            out = Path(output)
            save_model(model, out)
            written = out
            if recipe.target == "tensorrt":
                trt = write_trt_calibration_cache(
                    out.with_name(out.name.removesuffix(".onnx") + ".calibration.cache"),
                    prepared,
                    ranges,
                    method=recipe.method,
                    trt_version=trt_version,
                )
        return CalibrationResult(report, model, written, trt, prepared, from_cache, qdq_summary(model))


__all__ = [
    "DEFAULT_MAX_DROP",
    "SEARCH_STEPS",
    "Attempt",
    "CalibrationResult",
    "GateReport",
    "calibrate_model",
    "conv_sensitivity",
    "dequantized_tensors",
    "dice",
    "evaluate_dice",
    "make_session",
    "run_gate",
    "sensitivity_input",
    "sqnr",
    "tensor_sqnr",
]
