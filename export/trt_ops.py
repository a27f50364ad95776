"""Which ONNX operators TensorRT's ONNX parser imports, and with which tensor types.

Transcribed (not copied) from onnx-tensorrt's ``docs/operators.md`` as published for
**TensorRT 10.15** (onnx-tensorrt changelog: "TensorRT 10.15 GA Release - 2026-2-2"): the parser
supports opsets 9 to 24 there; TensorRT 10.0's parser stopped at opset 20. Update
:data:`SOURCE`, :data:`OPSET_RANGE` and the tables together when moving to a newer parser.

Type names are the table's: FP32, FP16, BF16, INT32, INT64, INT8, UINT8, BOOL (INT8 only as a
quantized type, through Q/DQ; UINT8 only as a network input or output). ``RESTRICTIONS`` keeps the
table's notes for the ops cmdeploy's graphs use; :mod:`cmdeploy.export.trt_lint` checks the ones
that can be checked statically.
"""

from __future__ import annotations

SOURCE = (
    "onnx-tensorrt docs/operators.md for TensorRT 10.15 (10.15 GA release, 2026-02-02); "
    "TensorRT 10.0's parser: opsets 9-20"
)
PARSER_VERSION = "10.15"
OPSET_RANGE = (9, 24)  # inclusive, TensorRT 10.15
OPSET_MAX_TRT_10_0 = 20  # TensorRT 10.0's parser
# from opset 20 GridSample's bilinear mode is spelt "linear", which older parsers read as nearest:
# graphs with GridSample (cmdeploy's fused graph) stay at <= 19
MAX_GRIDSAMPLE_OPSET = 19

_F = ("FP32", "FP16", "BF16")
_FI = (*_F, "INT32", "INT64")
_FIB = (*_FI, "BOOL")

#: op type -> supported tensor types (the ops marked "Y" in the table)
SUPPORTED: dict[str, tuple[str, ...]] = {
    **{op: _FI for op in (
        "Abs", "Add", "ArgMax", "ArgMin", "DepthToSpace", "Div", "Equal", "Greater",
        "GreaterOrEqual", "IsNaN", "Less", "LessOrEqual", "Max", "Min", "Mod", "Mul", "Neg",
        "Pow", "Range", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax",
        "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "Relu",
        "Scatter", "ScatterElements", "ScatterND", "Shrink", "Sign", "SpaceToDepth", "Sub",
        "Sum", "TopK",
    )},
    **{op: _FIB for op in (
        "Concat", "Expand", "EyeLike", "Flatten", "Gather", "GatherElements", "GatherND",
        "Identity", "If", "Loop", "OneHot", "Reshape", "ReverseSequence", "Shape", "Size",
        "Slice", "Split", "Squeeze", "Tile", "Transpose", "Trilu", "Unsqueeze", "Where",
    )},
    **{op: _F for op in (
        "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "AveragePool", "BatchNormalization",
        "Ceil", "Celu", "Clip", "Conv", "ConvTranspose", "Cos", "Cosh", "CumSum", "Dropout",
        "Einsum", "Elu", "Erf", "Exp", "Floor", "Gemm", "GlobalAveragePool", "GlobalLpPool",
        "GlobalMaxPool", "GroupNormalization", "GRU", "HardSigmoid", "HardSwish", "Hardmax",
        "ImageScaler", "InstanceNormalization", "IsInf", "LayerNormalization", "LeakyRelu",
        "Log", "LogSoftmax", "LRN", "LSTM", "LpNormalization", "LpPool", "MatMul", "MaxPool",
        "MeanVarianceNormalization", "ParametricSoftplus", "PRelu", "QuantizeLinear",
        "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Reciprocal",
        "Resize", "RMSNormalization", "RNN", "RotaryEmbedding", "Round", "ScaledTanh", "Scan",
        "Selu", "Sigmoid", "Sin", "Sinh", "Softmax", "Softplus", "Softsign", "Sqrt", "Tan",
        "Tanh", "ThresholdedRelu", "Upsample",
    )},
    **{op: ("FP32", "FP16") for op in (
        "BlackmanWindow", "DeformConv", "GridSample", "HammingWindow", "HannWindow", "Mish",
        "NonMaxSuppression", "NonZero", "RoiAlign",
    )},
    "And": ("BOOL",),
    "Not": ("BOOL",),
    "Or": ("BOOL",),
    "Xor": ("BOOL",),
    "Attention": (*_F, "INT8", "FP8"),
    "Cast": (*_FI, "UINT8", "BOOL"),
    "CastLike": (*_FI, "UINT8", "BOOL"),
    "Constant": (*_FIB, "FP8", "FP4", "INT4"),
    "ConstantOfShape": (*_FIB, "FP8", "FP4", "INT4"),
    "DequantizeLinear": ("INT8", "FP8", "FP4", "INT4"),
    "Gelu": (*_FI, "INT8"),
    "Mean": (*_FI, "FP8"),
    "Pad": _FI,
    "STFT": ("FP32",),
    "TensorScatter": (*_F, "INT32"),
}

#: ops the table lists as not supported ("N")
UNSUPPORTED: frozenset[str] = frozenset(
    {
        "AffineGrid", "Bernoulli", "BitShift", "BitwiseAnd", "BitwiseNot", "BitwiseOr",
        "BitwiseXor", "Col2Im", "CenterCropPad", "Compress", "ConcatFromSequence", "ConvInteger",
        "DFT", "Det", "DynamicQuantizeLinear", "ImageDecoder", "MatMulInteger", "MaxRoiPool",
        "MaxUnpool", "MelWeightMatrix", "Multinomial", "NegativeLogLikelihoodLoss", "Optional",
        "OptionalGetElement", "OptionalHasElement", "QLinearConv", "QLinearMatMul",
        "RegexFullMatch", "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase",
        "SequenceInsert", "SequenceLength", "SequenceMap", "SoftmaxCrossEntropyLoss",
        "SplitToSequence", "StringConcat", "StringNormalizer", "StringSplit", "TfIdfVectorizer",
        "Unique",
    }
)

#: the table's restrictions for ops in cmdeploy graphs (those checked by the lint say so)
RESTRICTIONS: dict[str, str] = {
    "DequantizeLinear": "x_zero_point must be zero (checked)",
    "QuantizeLinear": "y_zero_point must be 0 (checked)",
    "GridSample": "input must be 4D (checked)",
    "MaxPool": "2D or 3D only; the Indices output is unsupported (checked); dilations all ones",
    "Resize": "transformation modes half_pixel, pytorch_half_pixel, tf_half_pixel_for_nn, "
    "asymmetric, align_corners; modes nearest, linear; no antialias (checked)",
    "ReduceMax": "axes must be an initializer",
    "ReduceMin": "axes must be an initializer",
    "ReduceSum": "axes must be an initializer",
    "ReduceMean": "axes must be an initializer",
    "Squeeze": "axes must be resolvable to a constant",
    "Unsqueeze": "axes must be resolvable to a constant",
}

RESIZE_COORDINATE_MODES = frozenset(
    {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
)
RESIZE_MODES = frozenset({"nearest", "linear"})

__all__ = [
    "MAX_GRIDSAMPLE_OPSET",
    "OPSET_MAX_TRT_10_0",
    "OPSET_RANGE",
    "PARSER_VERSION",
    "RESIZE_COORDINATE_MODES",
    "RESIZE_MODES",
    "RESTRICTIONS",
    "SOURCE",
    "SUPPORTED",
    "UNSUPPORTED",
]
