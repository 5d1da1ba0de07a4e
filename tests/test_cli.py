"""The console script: help everywhere, one-line errors, JSON output, the offline commands end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cnnserve.cli import build_parser
from tests.helpers import cnnserve


def subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)  # type: ignore[arg-type]


def test_every_command_has_help() -> None:
    names = subcommands()
    assert {"train", "export", "shapes"} <= set(names)
    top = cnnserve("--help")
    assert top.returncode == 0
    for name in names:
        result = cnnserve(name, "--help")
        assert result.returncode == 0, name
        assert f"usage: cnnserve {name}" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--dataset", "imagenet", "--out", "{tmp}/x"], "unknown dataset"),
        (
            [
                "train",
                "--model",
                "lenet",
                "--dataset",
                "fashion-mnist",
                "--data-dir",
                "{tmp}",
                "--out",
                "{tmp}/x",
            ],
            "apt-get install",
        ),
        (["train", "--dataset", "digits", "--lr", "-1", "--out", "{tmp}/x"], "lr"),
        (["export", "{tmp}/missing", "--out", "{tmp}/y"], "model_card.json not found"),
        (["export", "{tmp}", "--out", "{tmp}/y", "--formats", "tflite"], "tflite"),
        (["shapes", "--model", "alexnet", "--input", "3,32,32"], "features.12"),
        (["shapes", "--model", "lenet", "--input", "banana"], "not a shape"),
    ],
)
def test_user_errors_are_one_line_without_traceback(tmp_path: Path, args: list[str], message: str) -> None:
    if args[0] == "export" and "tflite" in args:
        (tmp_path / "model_card.json").write_text("{}")
    result = cnnserve(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("cnnserve: error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr


def test_argparse_errors_exit_2() -> None:
    result = cnnserve("train", "--epochs", "0", "--out", "x")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_shapes_json() -> None:
    result = cnnserve(
        "shapes", "--model", "alexnet", "--num-classes", "1000", "--input", "3,224,224", "--json"
    )
    assert result.returncode == 0, result.stderr
    table = json.loads(result.stdout)
    assert table["total_parameters"] == 61_100_840
    assert table["layers"][0]["output_shape"] == [64, 55, 55]


def test_shapes_text_table() -> None:
    result = cnnserve("shapes", "--model", "lenet")
    assert result.returncode == 0
    assert "features.0" in result.stdout and "Total params: 61,706" in result.stdout


def test_train_export_shapes_end_to_end(tmp_path: Path) -> None:
    trained = cnnserve("train", "--dataset", "digits", "--dry-run", "--out", str(tmp_path / "ckpt"), "--json")
    assert trained.returncode == 0, trained.stderr
    assert json.loads(trained.stdout)["training"]["steps"] == 1
    exported = cnnserve("export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "export"), "--json")
    assert exported.returncode == 0, exported.stderr
    assert json.loads(exported.stdout)["passed"] is True
    described = cnnserve("shapes", str(tmp_path / "export"), "--json")
    assert described.returncode == 0 and json.loads(described.stdout)["output_shape"] == [10]
