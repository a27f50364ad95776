#!/usr/bin/env bash
# Load a repository written by `cmdeploy export --fused --triton-repo REPO [--engine m.plan]` in
# NVIDIA's Triton container on a GPU machine and compare what it serves with the local runtime.
#
#   examples/triton_gpu_check.sh REPO [MODEL_NAME]
#
# Needs: docker with the NVIDIA container toolkit, a GPU, and cmdeploy installed with the
# [triton] extra in the Python this script calls (PYTHON, default python3). Environment:
#   TRITON_IMAGE  container (default nvcr.io/nvidia/tritonserver:24.10-py3, Triton 2.51 / TensorRT 10.5;
#                 a plan must be built with the TensorRT version of the container that serves it)
#   HTTP_PORT     host port for Triton's HTTP endpoint (default 18000)
#   MIN_DICE      Dice every object must reach vs the local runtime (default 0.99; 0.98 for the plan)
# Exit 0: every served model agrees with the local runtime; 1: a comparison failed; 3: no server.
# This could not be run where cmdeploy is developed (no GPU, no container runtime).
set -euo pipefail
REPO="$(cd "${1:?usage: $0 REPO [MODEL_NAME]}" && pwd)"
NAME="${2:-cmdeploy}"
IMAGE="${TRITON_IMAGE:-nvcr.io/nvidia/tritonserver:24.10-py3}"
HTTP_PORT="${HTTP_PORT:-18000}"
PYTHON="${PYTHON:-python3}"
HERE="$(cd "$(dirname "$0")" && pwd)"

cid="$(docker run -d --rm --gpus all -p "127.0.0.1:${HTTP_PORT}:8000" -v "${REPO}:/models:ro" \
       "$IMAGE" tritonserver --model-repository=/models --strict-readiness=true)"
trap 'docker stop "$cid" >/dev/null 2>&1 || true' EXIT

models=("$NAME")
[ -d "${REPO}/${NAME}_trt" ] && models+=("${NAME}_trt")
for m in "${models[@]}"; do
  for _ in $(seq 300); do
    curl -sf "http://127.0.0.1:${HTTP_PORT}/v2/models/${m}/ready" >/dev/null && continue 2
    sleep 1
  done
  echo "error: model ${m} not ready after 300 s; server log:" >&2
  docker logs "$cid" 2>&1 | tail -40 >&2
  exit 3
done

# the reference: the fused ONNX of the repository, run by onnxruntime on this machine's CPU
ref="$(ls "${REPO}/${NAME}"/*/model.onnx | sort -V | tail -1)"
status=0
for m in "${models[@]}"; do
  min="${MIN_DICE:-0.99}"
  [ "$m" = "${NAME}_trt" ] && min="${MIN_DICE:-0.98}"
  echo "== ${m}"
  "$PYTHON" "${HERE}/triton_compare.py" --url "127.0.0.1:${HTTP_PORT}" --model-name "$m" \
      --reference "$ref" --min-dice "$min" || status=$?
done
exit "$status"
