"""The README tells the truth about configuration: every environment variable the code reads is documented."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_environment_variable_is_documented() -> None:
    code = "".join(p.read_text() for folder in ("service", "export") for p in (ROOT / folder).rglob("*.py"))
    code += "".join(p.read_text() for p in (ROOT / "service").rglob("*.sh"))
    variables = set(re.findall(r"\bCNNSERVE_[A-Z_]+[A-Z]\b", code))
    docs = (ROOT / "README.md").read_text() + (ROOT / "docs" / "deployment.md").read_text()
    assert variables, "found no CNNSERVE_ variables: the scan is broken"
    assert sorted(v for v in variables if v not in docs) == []


def test_readme_links_exist() -> None:
    text = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(((?:docs|protos|service)/[^)#]+)\)", text):
        assert (ROOT / target).exists(), target
