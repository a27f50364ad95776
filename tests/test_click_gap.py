"""benchmarks/click_gap.py: the exact - annotator Dice gap per object-size quartile."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_tool():
    spec = importlib.util.spec_from_file_location("click_gap", ROOT / "benchmarks" / "click_gap.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write(path: Path, areas: list[int], dice: list[float], pred: list[int]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case", "slice_index", "label", "piece", "area_px", "model:dice", "model:pred_area_px"])
        for i, (a, d, p) in enumerate(zip(areas, dice, pred, strict=True)):
            w.writerow(["c", i, "organ", 1, a, d, p])
    return path


def test_gap_per_size_quartile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tool = load_tool()
    areas = [10, 20, 30, 40, 100, 200, 300, 400]
    exact = write(tmp_path / "e.csv", areas, [0.9] * 8, areas)
    # small objects lose 0.2 with imprecise clicks and shrink to half; large ones keep their Dice
    annot = write(tmp_path / "a.csv", areas, [0.7, 0.7, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9],
                  [5, 10, 30, 40, 100, 200, 300, 400])
    assert tool.main([str(exact), str(annot)]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert rows[0] == "| 10–28 | 2 | 90.00 | 70.00 | 20.00 | 1.000 | 0.500 |"
    assert rows[1].split(" | ")[4] == "0.00"
    assert rows[-1].startswith("| all | 8 | 90.00 | 85.00 | 5.00 |")


def test_refuses_mismatched_or_missing_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tool = load_tool()
    a = write(tmp_path / "a.csv", [10, 20, 30, 40], [0.9] * 4, [10, 20, 30, 40])
    b = write(tmp_path / "b.csv", [10, 20, 30], [0.9] * 3, [10, 20, 30])
    assert tool.main([str(a), str(b)]) == 2
    assert "same objects" in capsys.readouterr().err
    assert tool.main([str(a), str(tmp_path / "none.csv")]) == 2
    assert tool.main([str(a), str(a), "--model", "other"]) == 2
    assert "other:dice" in capsys.readouterr().err
