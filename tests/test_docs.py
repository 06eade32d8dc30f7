"""The documentation cannot rot: the API reference builds from the docstrings with pdoc (in
the test extra) without an import failure, and the Markdown files' relative links resolve."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: what pdoc says when it cannot import a module it documents
IMPORT_FAILURES = ("Error importing", "Couldn't import", "Error loading", "Cannot find spec")
PAGES = ["index.html", "xpnet.html", "xpnet/backend.html", "xpnet/layers.html",
         "xpnet/models.html", "xpnet/optim.html", "xpnet/datasets.html", "xpnet/train.html",
         "xpnet/util.html", "xpnet/gradcheck.html", "xpnet/book_weights.html"]


def pdoc(module: str, out: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DL_BACKEND": "numpy"}
    return subprocess.run([sys.executable, "-m", "pdoc", module, "-o", str(out)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


def import_failures(proc: subprocess.CompletedProcess) -> list[str]:
    text = proc.stdout + proc.stderr
    return [line for line in text.splitlines() if any(f in line for f in IMPORT_FAILURES)]


@pytest.fixture(scope="module")
def pdoc_available():
    probe = subprocess.run([sys.executable, "-m", "pdoc", "--version"], capture_output=True,
                           text=True, timeout=60)
    assert probe.returncode == 0, "pdoc is missing: pip install -e '.[test]'"


def test_api_reference_builds(pdoc_available, tmp_path):
    out = tmp_path / "api"
    proc = pdoc("xpnet", out, ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert import_failures(proc) == [], proc.stderr[-4000:]
    missing = [p for p in PAGES if not (out / p).is_file()]
    assert missing == [], missing
    # a package with __all__ gets one page of its public names (pdoc's rule)
    train = (out / "xpnet/train.html").read_text()
    assert "Trainer" in train and "train_step" in train
    assert "smooth_curve" in (out / "xpnet/util.html").read_text()


def test_import_failures_are_noticed(pdoc_available, tmp_path):
    """The check above can fail: a module that cannot be imported is reported."""
    pkg = tmp_path / "broken_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('"""A package."""\n')
    (pkg / "bad.py").write_text('"""Fails."""\nimport module_that_does_not_exist\n')
    proc = pdoc("broken_pkg", tmp_path / "out", tmp_path)
    assert import_failures(proc), proc.stdout + proc.stderr


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("md", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(md):
    text = md.read_text()
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a URL or an anchor
        path = target.split("#")[0]
        if not (md.parent / path).exists():
            broken.append(target)
    assert broken == [], f"{md.name}: broken links {broken}"


def test_license_and_changelog():
    license_text = (ROOT / "LICENSE").read_text()
    assert license_text.startswith("MIT License") and "Copyright (c) 2026 the xpnet authors" \
        in license_text
    assert "## 0.1.0" in (ROOT / "CHANGELOG.md").read_text()
