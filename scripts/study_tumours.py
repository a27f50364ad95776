"""Issue 17's study, reduced to this machine: fine-tune on a few patients, label the rest from clicks,
train a U-Net on the generated labels vs on the ground truth, compare on held-out patients.

Run it with ``make study`` (or ``python scripts/study_tumours.py``); everything goes under
``runs/study/``. Each stage writes ``runs/study/stages/<stage>.json`` (command, wall time) when it
finishes and is skipped by a later run when that marker exists, so a killed study resumes.

Stages (the paper's section 4.2 workflow; patients never share a role, see ``SPLIT``):

1. ``base``: the class-agnostic CM model trained on ``ct-organs`` only (a shortened ``make model``
   recipe at a 128 px input), so tumours are new to it;
2. ``finetune``: ``cmdeploy train --init`` on the fine-tuning patients (one of them validates);
3. ``export``: the fine-tuned checkpoint -> ONNX;
4. ``labels`` (and ``labels_base``, the same with the base model, to show what fine-tuning bought):
   ``cmdeploy generate-labels --simulate`` on the labelling patients (simulated annotator clicks on
   their ground truth);
5. ``unet_gt`` / ``unet_generated``: the same U-Net recipe on the same slices of the labelling
   patients, once with ground-truth targets and once with generated ones, evaluated on the test
   patients' ground truth (all slices); the two arms run in parallel processes;
6. ``report``: ``runs/study/results.json`` and ``runs/study/results.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORGANS = ROOT.parent / "shared" / "data" / "ct-organs"
TUMOURS = ROOT.parent / "shared" / "data" / "ct-tumours"
OUT = ROOT / "runs" / "study"
CMDEPLOY = [str(Path(sys.executable).parent / "cmdeploy")]

# The fixed patient split (25 patients): 6 fine-tune (24 %; the last one validates the fine-tuning),
# 16 labelled from clicks (64 %), 3 test (12 %). Spread over the numbering so no block of
# consecutive patients lands in one role.
SPLIT = {
    "finetune_train": ["sts_001", "sts_005", "sts_009", "sts_013", "sts_017"],
    "finetune_val": ["sts_021"],
    "label": [
        "sts_002", "sts_003", "sts_004", "sts_006", "sts_007", "sts_010", "sts_011", "sts_012",
        "sts_014", "sts_015", "sts_016", "sts_019", "sts_020", "sts_022", "sts_024", "sts_025",
    ],
    "test": ["sts_008", "sts_018", "sts_023"],
}

THREADS = os.environ.get("STUDY_THREADS", "1")
BASE = [
    "train", "--data", str(ORGANS), "--guidance", "cm", "--config", "compact", "--input-size", "128",
    "--epochs", "8", "--samples-per-epoch", "1024", "--val-samples", "192", "--batch-size", "8",
    "--lr", "1e-3", "--seed", "0", "--threads", THREADS, "--no-progress",
    "--train-cases", "abdomen_3mm", "--val-cases", "thorax_1p5mm", "--out", str(OUT / "base"),
]
FINETUNE = [
    "train", "--data", str(TUMOURS), "--init", str(OUT / "base" / "best.pt"), "--epochs", "6",
    "--samples-per-epoch", "512", "--batch-size", "8", "--lr", "5e-4", "--seed", "0",
    "--threads", THREADS, "--no-progress", "--train-cases", ",".join(SPLIT["finetune_train"]),
    "--val-cases", ",".join(SPLIT["finetune_val"]), "--out", str(OUT / "finetune"),
]
EXPORTS = {
    "export": ["export", "--checkpoint", str(OUT / "finetune" / "best.pt"), "--output",
               str(OUT / "finetune" / "model.onnx")],
    "export_base": ["export", "--checkpoint", str(OUT / "base" / "best.pt"), "--output",
                    str(OUT / "base" / "model.onnx")],
}


def generate(model: Path, out: Path) -> list[str]:
    return [
        "generate-labels", "--data", str(TUMOURS), "--cases", ",".join(SPLIT["label"]), "--simulate",
        "--seed", "0", "--model", str(model), "--threads", THREADS, "--no-progress", "--output", str(out),
    ]


LABELS = {
    "labels": generate(OUT / "finetune" / "model.onnx", OUT / "labels"),
    "labels_base": generate(OUT / "base" / "model.onnx", OUT / "labels_base"),
}
# the U-Net recipe (identical for both arms)
UNET = {"size": 128, "width": 12, "depth": 4, "epochs": 10, "batch_size": 8, "lr": 1e-3, "seed": 0,
        "negatives": 0.25, "slice_stride": 1}


def log(msg: str) -> None:
    print(f"[{datetime.now(timezone.utc).strftime('%H:%M:%S')}] {msg}", flush=True)


def marker(stage: str) -> Path:
    return OUT / "stages" / f"{stage}.json"


def record(stage: str, command: list[str], seconds: float, **extra: object) -> None:
    path = marker(stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"stage": stage, "command": shlex.join(command), "seconds": seconds,
                               "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                               **extra}, indent=2))
    tmp.replace(path)


def run_stage(stage: str, args: list[str], *, cli: bool = True) -> None:
    if marker(stage).exists():
        log(f"{stage}: done before, skipped")
        return
    cmd = (CMDEPLOY + args) if cli else args
    shown = (["cmdeploy"] + args) if cli else args
    log(f"{stage}: {shlex.join(shown)}")
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    seconds = time.perf_counter() - t0
    record(stage, shown, seconds)
    log(f"{stage}: {seconds:.0f} s")


# ----------------------------------------------------------------------------------------- U-Net


def unet_arm(arm: str) -> None:
    """Train and test one arm (``gt`` or ``generated``); writes runs/study/unet_<arm>.json."""
    import numpy as np
    import torch

    from cmdeploy.train.supervised import (
        UNetRecipe,
        evaluate_volumes,
        load_case,
        predict_volume,
        select_slices,
        to_input,
        to_target,
    )

    t0 = time.perf_counter()
    recipe = UNetRecipe(**{k: v for k, v in UNET.items() if k not in ("negatives", "slice_stride")},
                        threads=int(THREADS))
    rng = np.random.default_rng(UNET["seed"])
    xs, ys, n_pos = [], [], 0
    for name in SPLIT["label"]:
        gt = load_case(TUMOURS / name / "image.nii.gz", TUMOURS / name / "labels.nii.gz", name)
        # the same slices for both arms: chosen on the ground truth (= the slices the annotator
        # clicked on), every `slice_stride`-th tumour slice plus a share of tumour-free ones
        idx = select_slices(gt.target, UNET["negatives"], rng)
        pos = idx[gt.target[idx].reshape(len(idx), -1).any(axis=1)]
        neg = np.setdiff1d(idx, pos)
        idx = np.sort(np.concatenate([pos[:: UNET["slice_stride"]], neg[:: UNET["slice_stride"]]]))
        n_pos += int(gt.target[idx].reshape(len(idx), -1).any(axis=1).sum())
        if arm == "gt":
            target = gt.target
        else:
            target = load_case(TUMOURS / name / "image.nii.gz", OUT / "labels" / name / "labels.nii.gz",
                               name).target
        xs.append(to_input(gt.image[idx], recipe.size))
        ys.append(to_target(target[idx], recipe.size))
    x, y = torch.cat(xs), torch.cat(ys)
    log(f"unet_{arm}: {len(x)} training slices ({n_pos} with tumour) from {len(SPLIT['label'])} patients")
    net, history = train_unet_logged(x, y, recipe, arm)
    pairs = []
    for name in SPLIT["test"]:
        case = load_case(TUMOURS / name / "image.nii.gz", TUMOURS / name / "labels.nii.gz", name)
        pairs.append((name, predict_volume(net, case.image, recipe.size), case.target))
    result = evaluate_volumes(pairs)
    result.update(arm=arm, recipe=UNET, train_slices=len(x), train_tumour_slices=n_pos, history=history,
                  seconds=time.perf_counter() - t0)
    (OUT / f"unet_{arm}.json").write_text(json.dumps(result, indent=2))
    torch.save(net.state_dict(), OUT / f"unet_{arm}.pt")
    p, o = result["over_patients"], result["over_objects"]
    log(f"unet_{arm}: test Dice {p['mean']:.4f} ± {p['std']:.4f} over patients, "
        f"{o['mean']:.4f} ± {o['std']:.4f} over {o['n']} objects")


def train_unet_logged(x, y, recipe, arm):  # noqa: ANN001, ANN201 - thin wrapper for the log prefix
    from cmdeploy.train.supervised import train_unet

    return train_unet(x, y, recipe, log=lambda m: log(f"unet_{arm}:{m}"))


def run_unets() -> None:
    todo = [a for a in ("gt", "generated") if not marker(f"unet_{a}").exists()]
    if not todo:
        log("unet: done before, skipped")
        return
    procs = {}
    for arm in todo:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--arm", arm]
        log(f"unet_{arm}: {shlex.join(['python', 'scripts/study_tumours.py', '--arm', arm])}")
        procs[arm] = (subprocess.Popen(cmd, cwd=ROOT), time.perf_counter())
    for arm, (proc, t0) in procs.items():
        if proc.wait() != 0:
            raise SystemExit(f"unet_{arm} failed with status {proc.returncode}")
        record(f"unet_{arm}", ["python", "scripts/study_tumours.py", "--arm", arm], time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------- report


def _pm(s: dict, scale: float = 100.0) -> str:
    return f"{s['mean'] * scale:.2f} ± {s['std'] * scale:.2f}" if s.get("n") else "-"


def report() -> dict:
    import numpy as np

    summary = json.loads((OUT / "labels" / "summary.json").read_text())
    base_summary = json.loads((OUT / "labels_base" / "summary.json").read_text())
    gt = json.loads((OUT / "unet_gt.json").read_text())
    gen = json.loads((OUT / "unet_generated.json").read_text())
    stages = {p.stem: json.loads(p.read_text()) for p in sorted((OUT / "stages").glob("*.json"))}
    finetune = json.loads((OUT / "finetune" / "metrics.json").read_text()) if (
        OUT / "finetune" / "metrics.json").exists() else None
    contour = _outline_pixels()
    res = {
        "split": SPLIT,
        "generated_labels": {
            "finetuned": {k: summary[k] for k in ("objects", "clicks", "generated_voxels", "reference_voxels",
                                                  "dice_over_objects", "dice_over_cases")},
            "base_model": {k: base_summary[k] for k in ("dice_over_objects", "dice_over_cases")},
            "outline_pixels": contour,
        },
        "unet_gt": {k: gt[k] for k in ("over_patients", "over_objects", "patients", "train_slices",
                                       "train_tumour_slices")},
        "unet_generated": {k: gen[k] for k in ("over_patients", "over_objects", "patients", "train_slices",
                                               "train_tumour_slices")},
        "paired_object_difference": _paired(gt, gen),
        "stages": {k: {"seconds": round(v["seconds"], 1), "command": v["command"]}
                   for k, v in stages.items()},
        "finetune_metrics": finetune,
    }
    (OUT / "results.json").write_text(json.dumps(res, indent=2))
    g = res["generated_labels"]["finetuned"]
    lines = [
        "| | ours (reduced scale, ct-tumours) | paper (CHAOS liver) |",
        "| --- | --- | --- |",
        f"| generated labels vs ground truth, labelling patients ({len(SPLIT['label'])}), Dice over objects "
        f"| {_pm(g['dice_over_objects'])} (n = {g['dice_over_objects']['n']}) | - |",
        f"| same, Dice over patients (3-D) | {_pm(g['dice_over_cases'])} | - |",
        f"| same with the base model (no fine-tuning), over objects / patients | "
        f"{_pm(res['generated_labels']['base_model']['dice_over_objects'])} / "
        f"{_pm(res['generated_labels']['base_model']['dice_over_cases'])} | - |",
        f"| U-Net on ground truth, test patients ({len(SPLIT['test'])}), over patients | "
        f"{_pm(gt['over_patients'])} | 91.70 ± 13.00 |",
        f"| U-Net on generated labels, over patients | {_pm(gen['over_patients'])} | 90.35 ± 9.89 |",
        f"| U-Net on ground truth, over objects (tumour slices, n = {gt['over_objects']['n']}) | "
        f"{_pm(gt['over_objects'])} | - |",
        f"| U-Net on generated labels, over objects | {_pm(gen['over_objects'])} | - |",
        f"| clicks a person would make (4 per object) | {g['clicks']} ({g['objects']} objects) | - |",
        f"| voxels drawn by hand instead (ground-truth tumour voxels; outline pixels) | "
        f"{g['reference_voxels']} ({contour} on the outlines) | - |",
    ]
    diff = res["paired_object_difference"]
    lines.append(
        f"\nPaired per-object difference (generated - ground truth arm): {diff['mean'] * 100:.2f} "
        f"(95 % bootstrap CI {diff['ci95'][0] * 100:.2f} .. {diff['ci95'][1] * 100:.2f}) Dice points."
    )
    lines.append("\nStage wall times (s): " + ", ".join(
        f"{k} {v['seconds']:.0f}" for k, v in res["stages"].items()))
    (OUT / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    del np
    return res


def _paired(gt: dict, gen: dict) -> dict:
    import numpy as np

    a = {(o["case"], o["slice_index"]): o["dice"] for o in gt["objects"]}
    b = {(o["case"], o["slice_index"]): o["dice"] for o in gen["objects"]}
    keys = sorted(a.keys() & b.keys())
    d = np.array([b[k] - a[k] for k in keys])
    if d.size == 0:
        return {"mean": 0.0, "ci95": [0.0, 0.0], "n": 0}
    rng = np.random.default_rng(0)
    boots = d[rng.integers(0, d.size, size=(2000, d.size))].mean(axis=1)
    ci = [float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))]
    return {"mean": float(d.mean()), "ci95": ci, "n": int(d.size)}


def _outline_pixels() -> int:
    """Pixels on the ground-truth outlines of the labelling patients (what tracing by hand covers)."""
    import numpy as np

    from cmdeploy.train.supervised import load_case

    total = 0
    for name in SPLIT["label"]:
        t = load_case(TUMOURS / name / "image.nii.gz", TUMOURS / name / "labels.nii.gz", name).target
        inner = np.zeros_like(t)
        inner[:, 1:-1, 1:-1] = (t[:, 1:-1, 1:-1] & t[:, :-2, 1:-1] & t[:, 2:, 1:-1]
                                & t[:, 1:-1, :-2] & t[:, 1:-1, 2:])
        total += int(np.count_nonzero(t & ~inner))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arm", choices=("gt", "generated"), help="internal: run one U-Net arm")
    args = ap.parse_args()
    if args.arm:
        unet_arm(args.arm)
        return
    roles = [n for v in SPLIT.values() for n in v]
    assert len(roles) == len(set(roles)) == 25, "a patient appears in two roles"
    for folder in (ORGANS, TUMOURS):
        if not folder.is_dir():
            raise SystemExit(f"data folder {folder} is missing")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "split.json").write_text(json.dumps(SPLIT, indent=2))
    t0 = time.perf_counter()
    run_stage("base", BASE)
    run_stage("finetune", FINETUNE)
    for name, args_ in EXPORTS.items():
        run_stage(name, args_)
    for name, args_ in LABELS.items():
        run_stage(name, args_)
    run_unets()
    report()
    log(f"study finished: {time.perf_counter() - t0:.0f} s in this run")


if __name__ == "__main__":
    main()
