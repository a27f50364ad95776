"""ONNX graph checks and exact float rewrites applied before INT8 quantization.

All rewrites are exact in real arithmetic (float results differ by rounding only); they change
which kernels onnxruntime can use once the graph is quantized:

* :func:`space_to_depth_first_conv` - the stem conv (7x7, stride 2, on 2-3 input channels) becomes
  ``SpaceToDepth(2)`` + a 4x4 stride-1 conv on 8-12 channels. onnxruntime's fast symmetric INT8
  conv kernel (MLAS ``ConvSym``, indirect convolution with fused requantisation) needs input and
  output channels that are multiples of 4; a 2-channel stem falls back to im2col + a generic GEMM.
* :func:`resize_bilinear_matmuls` - the PSP head upsamples each pyramid branch with two
  constant-matrix MatMuls (``U_h @ x @ U_w^T``, exact bilinear, half-pixel); they become one
  ``Resize`` (linear, half-pixel) each: fewer single-threaded ops and layout transposes.
* :func:`const_first_matmul_inputs` - the PSP head pools and resizes with constant matrices on the
  *left* of ``MatMul`` (``P_h @ x @ P_w^T``). Quantized as int8 weights, the left operand has the
  one type combination (int8 x uint8) that onnxruntime has no ``QLinearMatMul`` kernel for, so
  every such MatMul stays float between a DequantizeLinear and a QuantizeLinear. The averaging /
  interpolation matrices are non-negative, so quantizing them as uint8 (zero point 0) is lossless
  in range and makes every head MatMul a ``QLinearMatMul``.

:func:`output_tail` finds the nodes that stay float: the last Conv (the 1-channel logit conv) and
everything after it (the final bilinear upsampling).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

from cmdeploy.errors import ModelError
from cmdeploy.psp_matrices import bilinear_matrix  # re-exported
from cmdeploy.spec import ModelSpec

FUSED_INPUTS = ("slices", "points")
GRAPH_KEY = "cmdeploy.graph"


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    """The model's ``metadata_props`` as a dict."""
    return {p.key: p.value for p in model.metadata_props}


def check_plain(model: onnx.ModelProto, *, name: str = "model", batchnorm_ok: bool = False) -> ModelSpec:
    """The ModelSpec of a plain cmdeploy model; :class:`ModelError` for anything else.

    ``batchnorm_ok=False`` also refuses BatchNormalization nodes (they must be folded into the
    convolutions before quantization, or each BN would become a separate float/QDQ step).

    A fused-preprocessing graph (inputs ``slices`` + ``points``) is refused: its crop, window and
    guidance arithmetic is float geometry that INT8 would ruin, and quantizing only its network
    part would still leave that geometry in float. Quantize the plain export instead; the INT8
    model then runs with the NumPy preprocessing (:func:`cmdeploy.preprocess.prepare_batch`).
    """
    meta = metadata(model)
    inputs = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if meta.get(GRAPH_KEY) == "fused" or set(FUSED_INPUTS) <= set(inputs):
        raise ModelError(
            f"{name} is a fused-preprocessing graph (inputs {inputs}); INT8 calibration quantizes "
            "plain models only: export the plain graph (cmdeploy export without --fused) and "
            "calibrate that"
        )
    try:
        spec = ModelSpec.from_metadata(meta)
    except ValueError as exc:
        raise ModelError(f"{name}: {exc}") from None
    if len(inputs) != 1 or len(model.graph.output) != 1:
        raise ModelError(
            f"{name}: expected one input (N, C, S, S) and one output, got inputs {inputs} and "
            f"{len(model.graph.output)} output(s)"
        )
    ops = {n.op_type for n in model.graph.node}
    if not batchnorm_ok and "BatchNormalization" in ops:
        raise ModelError(
            f"{name} still has BatchNormalization nodes; fold them into the convolutions before "
            "quantizing (cmdeploy export does)"
        )
    return spec


def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """{tensor name: nodes reading it}."""
    out: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in model.graph.node:
        for t in n.input:
            out[t].append(n)
    return out


def conv_names(model: onnx.ModelProto) -> list[str]:
    """Names of the Conv nodes in graph order."""
    return [n.name for n in model.graph.node if n.op_type == "Conv"]


def output_tail(model: onnx.ModelProto) -> list[str]:
    """The last Conv feeding the graph output and every node downstream of it, in graph order."""
    nodes = list(model.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    outputs = {o.name for o in model.graph.output}
    # walk back from the outputs to the nearest Conv(s)
    lasts: set[str] = set()
    stack = [producer[o] for o in outputs if o in producer]
    seen: set[str] = set()
    while stack:
        n = stack.pop()
        if n.name in seen:
            continue
        seen.add(n.name)
        if n.op_type == "Conv":
            lasts.add(n.name)
            continue
        stack.extend(producer[t] for t in n.input if t in producer)
    if not lasts:
        raise ModelError("model has no Conv feeding its output")
    # everything reachable from those convs
    users = consumers(model)
    tail = set(lasts)
    frontier = [o for n in nodes if n.name in lasts for o in n.output]
    while frontier:
        t = frontier.pop()
        for n in users.get(t, []):
            if n.name not in tail:
                tail.add(n.name)
                frontier.extend(n.output)
    return [n.name for n in nodes if n.name in tail]


def prune_initializers(model: onnx.ModelProto) -> None:
    """Drop initializers no node reads."""
    used = {t for n in model.graph.node for t in n.input} | {o.name for o in model.graph.output}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def space_to_depth_first_conv(model: onnx.ModelProto, *, block: int = 2) -> str | None:
    """Rewrite the stem conv as ``SpaceToDepth(block)`` + stride-1 conv, in place.

    Applies to a Conv reading the graph input directly with stride ``block`` in both axes, square
    kernel k, dilation 1, group 1, equal pads p and a static spatial size divisible by ``block``.
    With ``L = ceil(p / s)`` padded blocks, ``off = L*s - p`` and ``K = (off + k - 1) // s + 1``,
    output pixel ``o`` reads blocks ``o .. o + K - 1``; the new weight is
    ``W'[:, (bh*s + bw)*C + c, jh, jw] = W[:, c, s*jh + bh - off, s*jw + bw - off]`` (0 outside
    the kernel), matching ONNX SpaceToDepth's channel order. Returns the conv's name, or None when
    nothing matched.
    """
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    graph_inputs = [i for i in g.input if i.name not in inits]
    if len(graph_inputs) != 1:
        return None
    inp = graph_inputs[0]
    dims = [d.dim_value if d.HasField("dim_value") else 0 for d in inp.type.tensor_type.shape.dim]
    s = block
    idx = next((i for i, n in enumerate(g.node) if n.op_type == "Conv" and n.input[0] == inp.name), None)
    if idx is None:
        return None
    n = g.node[idx]
    k = list(_attr(n, "kernel_shape", []))  # type: ignore[arg-type]
    strides = list(_attr(n, "strides", [1, 1]))  # type: ignore[arg-type]
    pads = list(_attr(n, "pads", [0, 0, 0, 0]))  # type: ignore[arg-type]
    dil = list(_attr(n, "dilations", [1, 1]))  # type: ignore[arg-type]
    if (
        len(dims) != 4
        or len(k) != 2
        or k[0] != k[1]
        or strides != [s, s]
        or dil != [1, 1]
        or _attr(n, "group", 1) != 1
        or len(set(pads)) != 1
        or _attr(n, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
        or n.input[1] not in inits
        or dims[2] <= 0
        or dims[3] <= 0
        or dims[2] % s
        or dims[3] % s
    ):
        return None
    k0, p = int(k[0]), int(pads[0])
    w = numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)
    cout, cin = w.shape[:2]
    lead = -(-p // s)
    off = lead * s - p
    kk = (off + k0 - 1) // s + 1
    out_size = (dims[2] + 2 * p - k0) // s + 1
    trail = max(0, out_size - 1 + kk - dims[2] // s - lead)
    # scatter the k x k taps into (block offset, block tap) pairs; s*s*kk*kk weight slices only
    w2 = np.zeros((cout, s * s * cin, kk, kk), np.float32)
    for bh in range(s):
        for bw in range(s):
            ch = slice((bh * s + bw) * cin, (bh * s + bw + 1) * cin)
            for jh in range(kk):
                th = s * jh + bh - off
                for jw in range(kk):
                    tw = s * jw + bw - off
                    if 0 <= th < k0 and 0 <= tw < k0:
                        w2[:, ch, jh, jw] = w[:, :, th, tw]
    wname = f"{n.input[1]}_s2d"
    g.initializer.append(numpy_helper.from_array(w2, wname))
    s2d_out = f"{inp.name}_space_to_depth"
    s2d = helper.make_node(
        "SpaceToDepth", [inp.name], [s2d_out], name=f"{n.name}_space_to_depth", blocksize=s
    )
    conv = helper.make_node(
        "Conv",
        [s2d_out, wname, *n.input[2:]],
        list(n.output),
        name=n.name,
        kernel_shape=[kk, kk],
        pads=[lead, lead, trail, trail],
        strides=[1, 1],
    )
    g.node.remove(n)
    g.node.insert(idx, conv)
    g.node.insert(idx, s2d)
    prune_initializers(model)
    return n.name


def resize_bilinear_matmuls(model: onnx.ModelProto, *, skip: set[str] | frozenset = frozenset()) -> list[str]:
    """Replace ``MatMul(U_h, x) -> MatMul(., U_w^T)`` pairs that are bilinear resizes by ``Resize``.

    A pair qualifies when ``U_h`` and ``U_w^T`` are initializers equal (to 1e-6) to
    :func:`bilinear_matrix` for their sizes - how the PSP head upsamples each pyramid branch. The
    Resize (linear, half-pixel, output ``sizes`` = the input's leading dims + ``(H_out, W_out)``)
    is one op instead of two small batched GEMMs, and onnxruntime then keeps the concat that
    follows in NHWC (one layout transpose less). Needs opset >= 15 (``Shape`` start/end);
    nodes in ``skip`` are left alone. Returns the names of the first MatMul of each pair replaced.
    """
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 15:
        return []
    inits = {i.name: i for i in model.graph.initializer}
    users = consumers(model)
    graph_outputs = {o.name for o in model.graph.output}
    replaced: list[str] = []
    for first in list(model.graph.node):
        if first.op_type != "MatMul" or first.name in skip or first.input[0] not in inits:
            continue
        nxt = users.get(first.output[0], [])
        if len(nxt) != 1 or first.output[0] in graph_outputs:
            continue
        second = nxt[0]
        if second.op_type != "MatMul" or second.name in skip or second.input[0] != first.output[0]:
            continue
        if second.input[1] not in inits:
            continue
        uh = numpy_helper.to_array(inits[first.input[0]]).astype(np.float64)
        uwt = numpy_helper.to_array(inits[second.input[1]]).astype(np.float64)
        if uh.ndim != 2 or uwt.ndim != 2:
            continue
        (h_out, h_in), (w_in, w_out) = uh.shape, uwt.shape
        if not (
            np.allclose(uh, bilinear_matrix(h_in, h_out), atol=1e-6)
            and np.allclose(uwt, bilinear_matrix(w_in, w_out).T, atol=1e-6)
        ):
            continue
        x, base = first.input[1], first.name
        sizes_hw = f"{base}_resize_hw"
        model.graph.initializer.append(numpy_helper.from_array(np.array([h_out, w_out], np.int64), sizes_hw))
        new = [
            helper.make_node("Shape", [x], [f"{base}_lead_dims"], name=f"{base}_lead_dims", start=0, end=-2),
            helper.make_node(
                "Concat", [f"{base}_lead_dims", sizes_hw], [f"{base}_sizes"], name=f"{base}_sizes", axis=0
            ),
            helper.make_node(
                "Resize",
                [x, "", "", f"{base}_sizes"],
                [second.output[0]],
                name=f"{base}_resize",
                mode="linear",
                coordinate_transformation_mode="half_pixel",
            ),
        ]
        idx = list(model.graph.node).index(first)
        model.graph.node.remove(first)
        model.graph.node.remove(second)
        for k, node in enumerate(new):
            model.graph.node.insert(idx + k, node)
        replaced.append(base)
    if replaced:
        prune_initializers(model)
    return replaced


def max_abs_difference(a: onnx.ModelProto, b: onnx.ModelProto, x: np.ndarray) -> tuple[float, float]:
    """(max |out_a - out_b|, max |out_a|) of two single-input, single-output models on ``x``."""
    import onnxruntime as ort

    outs = []
    for m in (a, b):
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        outs.append(sess.run(None, {sess.get_inputs()[0].name: x})[0])
    return float(np.abs(outs[0] - outs[1]).max()), float(np.abs(outs[0]).max())


def quantize_before_space_to_depth(model: onnx.ModelProto) -> bool:
    """In a QDQ model, swap ``SpaceToDepth -> QuantizeLinear`` into ``QuantizeLinear ->
    SpaceToDepth`` (in place), so the rearrangement moves uint8 instead of float32 data.

    Exact: per-tensor quantization commutes with a permutation of elements. Returns whether a
    pair was swapped.
    """
    users = consumers(model)
    nodes = list(model.graph.node)
    for i, s2d in enumerate(nodes):
        if s2d.op_type != "SpaceToDepth":
            continue
        readers = users.get(s2d.output[0], [])
        if len(readers) != 1 or readers[0].op_type != "QuantizeLinear":
            continue
        q = readers[0]
        scale_zp = list(q.input[1:])
        if any(t in {o.name for o in model.graph.output} for t in (s2d.output[0],)):
            continue
        inits = {t.name: t for t in model.graph.initializer}
        if any(t not in inits or numpy_helper.to_array(inits[t]).size != 1 for t in scale_zp):
            continue  # per-axis quantization would not commute
        q_out, src = q.output[0], s2d.input[0]
        packed = f"{src}_quantized_before_space_to_depth"
        q.input[0], q.output[0] = src, packed
        s2d.input[0], s2d.output[0] = packed, q_out
        j = nodes.index(q)
        del model.graph.node[j]
        model.graph.node.insert(i, q)
        return True
    return False


def const_first_matmul_inputs(
    model: onnx.ModelProto, *, skip: set[str] | frozenset = frozenset()
) -> list[str]:
    """Initializers used as the *first* input of a MatMul (skipping nodes in ``skip``) whose
    values are all >= 0 - the head's pooling and interpolation matrices."""
    inits = {i.name: i for i in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type != "MatMul" or n.name in skip or n.input[0] not in inits:
            continue
        if n.input[0] in out:
            continue
        if float(numpy_helper.to_array(inits[n.input[0]]).min()) >= 0.0:
            out.append(n.input[0])
    return out


__all__ = [
    "FUSED_INPUTS",
    "GRAPH_KEY",
    "check_plain",
    "const_first_matmul_inputs",
    "consumers",
    "conv_names",
    "metadata",
    "output_tail",
    "prune_initializers",
    "bilinear_matrix",
    "max_abs_difference",
    "quantize_before_space_to_depth",
    "resize_bilinear_matmuls",
    "space_to_depth_first_conv",
]
