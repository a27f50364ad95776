"""Recover a weights-only training checkpoint from a plain cmdeploy ONNX export.

    python scripts/checkpoint_from_onnx.py cmdeploy/models/cmdeploy-default.onnx default.pt

The plain export folds every BatchNorm into the convolution before it (weight scaled, bias
added). This puts the folded weights back into a freshly built ResNet-PSP of the model's
``cmdeploy.model_config`` and makes each BatchNorm the identity plus the folded bias (gamma 1,
running mean 0, running variance 1 - eps, beta = the conv bias), so the checkpoint computes the
same function in eval mode and exporting it again gives the same ONNX weights. The spec, metrics
and training record come from the ONNX metadata. What cannot come back: the original BatchNorm
statistics (a fine-tune in train mode normalises with batch statistics from the first step; use
``--freeze-backbone``, which keeps the backbone's BatchNorm as it is) and the optimiser state.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from cmdeploy.spec import ModelSpec
from cmdeploy.train.checkpoint import Checkpoint
from cmdeploy.train.model import ModelConfig, build_model


def bn_of(conv: str) -> str:
    """Name of the BatchNorm that follows convolution ``conv`` in ResNetPSP."""
    for pattern, repl in ((r"conv(\d)$", r"bn\1"), (r"downsample\.0$", "downsample.1"),
                          (r"\.conv$", ".bn"), (r"fuse\.0$", "fuse.1")):
        if re.search(pattern, conv):
            return re.sub(pattern, repl, conv)
    raise KeyError(conv)


def recover(onnx_path: str) -> Checkpoint:
    try:
        model_proto = onnx.load(onnx_path)
    except Exception as exc:  # protobuf decode errors of several types
        raise ValueError(f"{onnx_path}: not an ONNX model ({type(exc).__name__})") from exc
    meta = {p.key: p.value for p in model_proto.metadata_props}
    if meta.get("cmdeploy.graph") != "plain":
        raise ValueError(f"{onnx_path}: needs a plain cmdeploy export (cmdeploy.graph = plain)")
    weights = {i.name: numpy_helper.to_array(i) for i in model_proto.graph.initializer}
    config = ModelConfig.from_dict(json.loads(meta["cmdeploy.model_config"]))
    spec = ModelSpec.from_metadata(meta)
    model = build_model(config)
    state = model.state_dict()
    for name, value in weights.items():
        if not name.endswith(".weight") or name[: -len(".weight")] + ".weight" not in state:
            continue
        conv = name[: -len(".weight")]
        state[name] = torch.from_numpy(value.copy())
        bias = weights.get(conv + ".bias")
        if conv + ".bias" in state:  # a convolution with its own bias (the classifier)
            state[conv + ".bias"] = torch.from_numpy(bias.copy())
            continue
        bn = bn_of(conv)
        eps = dict(model.named_modules())[bn].eps
        state[bn + ".weight"] = torch.ones_like(state[bn + ".weight"])
        state[bn + ".bias"] = torch.from_numpy(bias.copy())
        state[bn + ".running_mean"] = torch.zeros_like(state[bn + ".running_mean"])
        state[bn + ".running_var"] = torch.full_like(state[bn + ".running_var"], np.float32(1.0 - eps))
    model.load_state_dict(state)
    train = json.loads(meta.get("cmdeploy.train", "{}"))
    train["recovered_from_onnx"] = {
        "checkpoint_sha256": meta.get("cmdeploy.checkpoint_sha256"),
        "note": "BatchNorm folded at export: identity BatchNorm plus the folded bias; original "
        "BatchNorm statistics and optimiser state are not recoverable",
    }
    return Checkpoint.from_model(
        model, spec, model_config=config, train_info=train,
        metrics=json.loads(meta.get("cmdeploy.metrics", "{}")), epoch=int(meta.get("cmdeploy.epoch", 0)),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("onnx_model")
    ap.add_argument("output")
    args = ap.parse_args()
    if not Path(args.onnx_model).is_file():
        ap.error(f"{args.onnx_model} is not a file")
    if Path(args.output).exists():
        ap.error(f"{args.output} exists: remove it first (nothing is overwritten)")
    try:
        checkpoint = recover(args.onnx_model)
    except ValueError as exc:
        ap.error(str(exc))
    path = checkpoint.save(args.output)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
