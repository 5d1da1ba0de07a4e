"""Imports go one way (docs/architecture.md, "Packages and layers"), checked by parsing the source (``ast``).

- The library layers of ``cnnserve`` (models, serving, gateway, client, runtime, ...) never import
  ``cnnserve_export`` nor a composition root.
- The composition roots (``cnnserve.cli``, ``cnnserve.bench``, ``cnnserve.gpu_check``) may import
  ``cnnserve_export``, but only inside a function (or under ``TYPE_CHECKING``), so importing them stays light.
- ``cnnserve_export`` imports the ``cnnserve`` library, never a composition root.

Nothing here is imported: a module that would fail to import is still checked.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE_ROOTS = (ROOT / "service", ROOT / "export")
EXPORT = "cnnserve_export"
COMPOSITION_ROOTS = ("cnnserve.cli", "cnnserve.bench", "cnnserve.gpu_check")
# protoc output: never edited, imports only protobuf
GENERATED = ("cnnserve.v1", "cnnserve.torchserve_api", "cnnserve.oip_api")


@dataclass(frozen=True)
class Import:
    module: str  # the module that imports
    target: str  # what it imports, absolute (``from a import b`` gives ``a.b``: b may be a module)
    line: int
    lazy: bool  # inside a function, or under ``if TYPE_CHECKING:``: not run when the module is imported


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _module_name(path: Path, source_root: Path) -> str:
    parts = list(path.relative_to(source_root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute package ``from`` names, relative imports resolved against ``module``."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def parse_imports(path: Path, module: str) -> list[Import]:
    """Every import statement of one file, with whether it runs when the module is imported."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[Import] = []
    is_package = path.name == "__init__.py"

    def visit(node: ast.AST, lazy: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend(Import(module, alias.name, node.lineno, lazy) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, is_package, node)
            found.append(Import(module, base, node.lineno, lazy))
            found.extend(
                Import(module, f"{base}.{alias.name}", node.lineno, lazy)
                for alias in node.names
                if alias.name != "*"
            )
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(node, ast.If) and _is_type_checking(node.test) and child in node.body:
                inner = True
            visit(child, inner)

    visit(tree, False)
    return found


def source_imports() -> list[Import]:
    imports = []
    for source_root in SOURCE_ROOTS:
        for path in sorted(source_root.rglob("*.py")):
            module = _module_name(path, source_root)
            if not any(_within(module, generated) for generated in GENERATED):
                imports.extend(parse_imports(path, module))
    return imports


def violations(imports: list[Import]) -> list[str]:
    """Each import that breaks the rule, as ``module:line imports target (why)``."""
    found = []
    for item in imports:
        root = any(_within(item.module, r) for r in COMPOSITION_ROOTS)
        to_root = any(_within(item.target, r) for r in COMPOSITION_ROOTS)
        to_export = _within(item.target, EXPORT)
        where = f"{item.module}:{item.line} imports {item.target}"
        if _within(item.module, EXPORT):
            if to_root:
                found.append(f"{where} (cnnserve_export must not import a composition root)")
        elif root:
            if to_export and not item.lazy:
                found.append(f"{where} (a composition root imports cnnserve_export inside a function only)")
        elif _within(item.module, "cnnserve"):
            if to_export:
                found.append(f"{where} (the cnnserve library never imports cnnserve_export)")
            elif to_root:
                found.append(f"{where} (the cnnserve library never imports a composition root)")
    return found


def test_the_source_tree_follows_the_import_rule() -> None:
    imports = source_imports()
    modules = {item.module for item in imports}
    # The scan saw both packages and every composition root: an empty walk would pass vacuously.
    for expected in (
        EXPORT + ".train",
        "cnnserve.gateway.core",
        "cnnserve.serving.service",
        *COMPOSITION_ROOTS,
    ):
        assert any(_within(module, expected) for module in modules), expected
    assert violations(imports) == []


def _check(tmp_path: Path, module: str, source: str) -> list[str]:
    path = tmp_path / (module.replace(".", "_") + ".py")
    path.write_text(source)
    return violations(parse_imports(path, module))


@pytest.mark.parametrize(
    ("module", "source", "broken"),
    [
        ("cnnserve.gateway.core", "from cnnserve_export.data import load_dataset\n", True),
        ("cnnserve.runtime", "def f():\n    import cnnserve_export.train\n", True),  # lazily is no excuse
        ("cnnserve.client", "from cnnserve.cli import main\n", True),
        ("cnnserve.bench.scenarios", "from cnnserve_export.data import load_dataset\n", True),
        ("cnnserve.cli.offline", "import cnnserve_export\n", True),
        ("cnnserve_export.train", "from cnnserve.bench.results import Row\n", True),
        ("cnnserve.bench.scenarios", "def f():\n    from cnnserve_export.data import load_dataset\n", False),
        (
            "cnnserve.gpu_check",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import cnnserve_export.train\n",
            False,
        ),
        ("cnnserve_export.train", "from cnnserve.models import get_spec\n", False),
        ("cnnserve.gateway.core", "from cnnserve.errors import CnnserveError\n", False),
    ],
)
def test_the_rule_catches_what_it_forbids(tmp_path: Path, module: str, source: str, broken: bool) -> None:
    assert bool(_check(tmp_path, module, source)) is broken


def test_relative_imports_are_resolved(tmp_path: Path) -> None:
    package = tmp_path / "__init__.py"
    package.write_text("from ..cli import main\n")
    why = "(the cnnserve library never imports a composition root)"
    assert violations(parse_imports(package, "cnnserve.gateway")) == [
        f"cnnserve.gateway:1 imports cnnserve.cli {why}",
        f"cnnserve.gateway:1 imports cnnserve.cli.main {why}",
    ]
