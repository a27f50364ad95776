#!/usr/bin/env bash
# One command on a machine with an NVIDIA GPU and TensorRT: lint, build FP32/FP16/INT8 engines of
# the shipped models, compare them with onnxruntime (Polygraphy's Comparator, real CT slices) and
# print the parity/latency table (benchmarks/trt_parity.py). Inside NVIDIA's NGC TensorRT
# container, from the repository root:
#
#   docker run --rm --gpus all -v "$PWD":/w -w /w nvcr.io/nvidia/tensorrt:25.01-py3 scripts/trt_check.sh
#
# Extra arguments go to benchmarks/trt_parity.py (--out DIR, --data DIR). Exit: 0 all engines
# agree, 1 a parity failure, 2 no TensorRT/GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import tensorrt" 2>/dev/null; then
  echo "TensorRT's Python package is not importable: run this inside the NGC TensorRT container" >&2
  echo "(nvcr.io/nvidia/tensorrt:<release>-py3) or install TensorRT 10/11 for this Python" >&2
  exit 2
fi
# a venv that sees the container's tensorrt; cmdeploy with the export + calibration extras
VENV=${VENV:-.venv-trt}
[ -x "$VENV/bin/python" ] || "$PY" -m venv --system-site-packages "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet -e '.[export,calibrate,dicom,nifti]' 'cuda-python>=12,<13' 'polygraphy>=0.49'
exec "$VENV/bin/python" benchmarks/trt_parity.py "$@"
