"""Compare a Triton-served cmdeploy model with the local runtime, object by object.

    python examples/triton_compare.py --url HOST:PORT [--model-name cmdeploy] --reference model.onnx

Sends synthetic CT-like objects (a disc of soft tissue in noisy fat, 512 x 512 and 320 x 256 slices,
seeded) through :class:`cmdeploy.backends.triton.TritonRunner` (the client ``cmdeploy infer --triton``
uses) and through ``Segmenter.load(reference)`` on this machine's onnxruntime, then prints the
largest probability difference, the mask agreement and the Dice per object.
Exit 0 when every object's Dice >= --min-dice, 1 otherwise, 3 when the server cannot be used.

Works with ``cmdeploy triton`` (PyTriton, CPU) and with a repository written by
``cmdeploy export --fused --triton-repo`` loaded in NVIDIA's Triton container
(``examples/triton_gpu_check.sh`` runs the whole check in one command).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def synthetic_objects(n: int, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """n (slice HU (H, W), points (4, 2) left/right/top/bottom as (x, y)) pairs."""
    rng = np.random.default_rng(seed)
    slices, pts = [], []
    for k in range(n):
        h, w = (512, 512) if k % 2 == 0 else (320, 256)
        yy, xx = np.mgrid[:h, :w]
        cy, cx = rng.uniform(0.35, 0.65) * h, rng.uniform(0.35, 0.65) * w
        r = rng.uniform(15, 60)
        s = rng.normal(-100, 40, (h, w)) + 150 * (((yy - cy) / r) ** 2 + ((xx - cx) / (0.8 * r)) ** 2 < 1)
        slices.append(np.round(s).astype(np.float32))
        pts.append([[cx - 0.8 * r, cy], [cx + 0.8 * r, cy], [cx, cy - r], [cx, cy + r]])
    return slices, np.asarray(pts, np.float32)


def main(argv: list[str] | None = None) -> int:
    from cmdeploy import Segmenter
    from cmdeploy.backends.triton import connect_segmenter
    from cmdeploy.errors import ModelError

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True, help="HOST:PORT (HTTP) or grpc://HOST:PORT")
    ap.add_argument("--model-name", default="cmdeploy")
    ap.add_argument("--reference", required=True, help="local cmdeploy model (.onnx) to compare with")
    ap.add_argument("--objects", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--min-dice", type=float, default=0.99)
    args = ap.parse_args(argv)

    try:
        remote = connect_segmenter(args.url, model_name=args.model_name, batch_size=args.batch_size)
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    local = Segmenter.load(args.reference, batch_size=args.batch_size)
    slices, pts = synthetic_objects(args.objects)
    try:
        got = remote.predict_batch(slices, pts, return_probabilities=True)
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    want = local.predict_batch(slices, pts, return_probabilities=True)
    print(f"served: {args.model_name} at {remote._runner.url} ({remote.model_path.name}); "
          f"local: {local.model_path.name}")
    worst = 1.0
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        mg, mw = g > remote.threshold, w > local.threshold
        inter, total = np.count_nonzero(mg & mw), np.count_nonzero(mg) + np.count_nonzero(mw)
        dice = 1.0 if total == 0 else 2 * inter / total
        worst = min(worst, dice)
        print(f"object {k:3d} {g.shape[0]}x{g.shape[1]}: max|dp| {np.abs(g - w).max():.2e}  "
              f"agreement {np.mean(mg == mw):.6f}  dice {dice:.6f}")
    ok = worst >= args.min_dice
    print(f"{'PASS' if ok else 'FAIL'}: lowest Dice {worst:.6f} (need >= {args.min_dice})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
