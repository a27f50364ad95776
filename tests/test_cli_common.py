"""cmdeploy.commands._common: error -> exit status mapping shared by the commands."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import typer
from rich.console import Console

from cmdeploy.commands._common import exit_on_error, fail
from cmdeploy.errors import InputError, ModelError
from cmdeploy.writers.report import json_default


def _console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=20, highlight=False), buf


@pytest.mark.parametrize(
    ("exc", "code", "prefix"),
    [
        (InputError("bad [input] " + "x" * 40), 2, "error: bad [input] "),
        (ModelError("broken model"), 3, "model/runtime error: broken model"),
        (OSError("disk full"), 3, "model/runtime error: disk full"),
    ],
)
def test_exit_on_error_maps_errors_to_statuses(exc, code, prefix) -> None:
    err, buf = _console()
    with pytest.raises(typer.Exit) as info, exit_on_error(err):
        raise exc
    assert info.value.exit_code == code
    out = buf.getvalue()
    assert out.startswith(prefix) and out.count("\n") == 1  # one unwrapped line, markup escaped


def test_exit_on_error_narrower_model_errors_and_passthrough() -> None:
    err, buf = _console()
    only_model = exit_on_error(err, model_errors=(ModelError,))
    with pytest.raises(RuntimeError, match="not a model error"), only_model:
        raise RuntimeError("not a model error")
    with exit_on_error(err):
        pass
    assert buf.getvalue() == ""


def test_fail_prints_and_exits(capsys) -> None:
    with pytest.raises(typer.Exit) as info:
        fail("--x is wrong", code=1)
    assert info.value.exit_code == 1
    assert capsys.readouterr().err == "error: --x is wrong\n"


def test_json_default() -> None:
    assert json_default(np.arange(3)) == [0, 1, 2]
    assert json_default(np.float32(0.5)) == 0.5
    assert json_default(math.inf) is None
    assert json_default(object).startswith("<class")


def test_no_traceback_turns_unexpected_errors_into_exit_3(monkeypatch) -> None:
    from cmdeploy.commands._common import no_traceback

    err, buf = _console()
    monkeypatch.delenv("CMDEPLOY_DEBUG", raising=False)
    with pytest.raises(typer.Exit) as info, no_traceback(err):
        raise AttributeError("no attribute 'PatientBirthDate'")
    assert info.value.exit_code == 3
    assert buf.getvalue().startswith("internal error: AttributeError: no attribute")
    with pytest.raises(typer.Exit) as info, no_traceback(err):  # exits pass through untouched
        raise typer.Exit(2)
    assert info.value.exit_code == 2
    monkeypatch.setenv("CMDEPLOY_DEBUG", "1")
    with pytest.raises(AttributeError), no_traceback(err):
        raise AttributeError("shown with its traceback")


def test_require_names_the_extra_without_importing(capsys) -> None:
    from cmdeploy.commands._common import require

    require("json", "dev", "anything")  # installed: no exit
    with pytest.raises(typer.Exit) as info:
        require("no_such_module_xyz", "train", "training")
    assert info.value.exit_code == 2
    assert "training needs no_such_module_xyz: pip install 'cmdeploy[train]'" in capsys.readouterr().err
