"""The code a model archive bundles must run on Python 3.9: the official TorchServe 0.12 images have it.

Ruff lints those files with target py39 (pyproject.toml); vermin finds 3.10+ library features such as
``zip(strict=...)``; and the AST check below finds ``X | Y`` type unions evaluated at run time (in
``isinstance`` or aliases), which neither tool reports.
"""

from __future__ import annotations

import ast
import builtins
import subprocess
import sys
from pathlib import Path

import cnnserve
from cnnserve_export.archive import WORKER_PACKAGE_PARTS

PACKAGE = Path(cnnserve.__file__).parent


def worker_files() -> list[Path]:
    files: list[Path] = []
    for part in WORKER_PACKAGE_PARTS:
        path = PACKAGE / part
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path] if path.suffix == ".py" else []
    return files


_TYPE_NAMES = {name for name in dir(builtins) if isinstance(getattr(builtins, name), type)}


def _type_like(node: ast.expr) -> bool:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _type_like(node.left) and _type_like(node.right)
    if isinstance(node, ast.Constant):
        return node.value is None
    if isinstance(node, ast.Subscript):
        return _type_like(node.value)
    name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
    return bool(name) and (name in _TYPE_NAMES or name[0].isupper())


def runtime_unions(path: Path) -> list[int]:
    """Lines with ``A | B`` of types outside annotations (annotations are strings under PEP 563)."""
    tree = ast.parse(path.read_text())
    annotations: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.arg) and node.annotation is not None:
            annotations.add(id(node.annotation))
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.returns is not None:
            annotations.add(id(node.returns))
        elif isinstance(node, ast.AnnAssign):
            annotations.add(id(node.annotation))
    found: list[int] = []

    def visit(node: ast.AST, in_annotation: bool) -> None:
        in_annotation = in_annotation or id(node) in annotations
        if (
            not in_annotation
            and isinstance(node, ast.BinOp)
            and isinstance(node.op, ast.BitOr)
            and _type_like(node)
        ):
            found.append(node.lineno)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, in_annotation)

    visit(tree, False)
    return found


def test_the_checker_catches_runtime_unions(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from __future__ import annotations\n"
        "def f(x: int | None) -> str | None:\n"
        "    y: list[int] | None = None\n"
        "    return isinstance(x, int | str)\n"
        "Alias = bytes | None\n"
        "flags = {1} | {2}\n"
    )
    assert runtime_unions(sample) == [4, 5]


def test_worker_modules_have_no_runtime_unions() -> None:
    offenders = {str(p.relative_to(PACKAGE)): lines for p in worker_files() if (lines := runtime_unions(p))}
    assert offenders == {}


def test_worker_modules_need_at_most_python_3_9() -> None:
    vermin = str(Path(sys.executable).parent / "vermin")
    files = [str(p) for p in worker_files()]
    flags = ["-t=3.9-", "--violations", "--no-tips", "--eval-annotations"]
    result = subprocess.run([vermin, *flags, *files], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
