"""The project's own promises: README's commands and CI agree; the installed package is the
one imported, even beside a clone named xpnet; the version is the distribution's."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

import xpnet

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_readme_test_command():
    readme = (ROOT / "README.md").read_text().splitlines()
    fence = readme.index("```bash")
    first_two = [line.split("#")[0].strip() for line in readme[fence + 1 : fence + 3]]
    test_command = first_two[1].split("&&")[-1].strip()
    assert test_command.startswith("python -m pytest")
    ci_lines = [ln.strip() for ln in (ROOT / ".ci/run").read_text().splitlines()]
    assert ci_lines[-1] == test_command
    assert "pip install -e '.[test]'" in first_two[1]
    assert first_two[0].startswith("pip install -e . ")
    assert first_two[0].endswith("python train.py")


def test_version_is_the_distributions():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert xpnet.__version__ == metadata.version("xpnet") == declared


def test_version_fallback_without_metadata(monkeypatch):
    """From a checkout that is not installed, the version comes from its pyproject.toml."""
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert xpnet._version() == declared


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A clone of this repository named ``xpnet``, as ``git clone`` names it."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout")
    dest = tmp_path_factory.mktemp("clone-parent") / "xpnet"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(dest)], check=True,
                   capture_output=True, timeout=120)
    return dest


def _python(code: str, cwd: Path, *flags: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_import_from_the_clones_parent_gets_the_installed_package(clone):
    """With the clone named xpnet in the working directory, `import xpnet` must not take
    the clone for a namespace package (nor its train.py for xpnet.train)."""
    proc = _python("import xpnet; from xpnet.train import Trainer; from xpnet.train import cli; "
                   "print(xpnet.__file__); print(xpnet.__version__)", clone.parent)
    assert proc.returncode == 0, (
        f"{proc.stderr}\n(an install made before pyproject's package-dir setting? "
        "run: pip install -e .)")
    file, version = proc.stdout.split()
    assert Path(file).resolve() == Path(xpnet.__file__).resolve()
    assert version == xpnet.__version__


def test_editable_install_of_a_fresh_clone_is_a_path_entry(clone, tmp_path):
    """What `pip install -e .` makes of a fresh clone: a .pth naming the clone's root (no
    import hook that a namespace package in the working directory would shadow), so
    that the clone's parent imports the clone's own package, and `python train.py` runs."""
    # setuptools is in the test extra: this runs in CI, not skips
    wheel_dir = tmp_path / "wheel"
    wheel_dir.mkdir()
    build = _python(f"from setuptools import build_meta; "
                    f"print(build_meta.build_editable({str(wheel_dir)!r}))", clone)
    assert build.returncode == 0, build.stderr
    wheel = wheel_dir / build.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        pth = [n for n in names if n.endswith(".pth")]
        assert not [n for n in names if n.endswith("_finder.py")], names
        assert len(pth) == 1, names
        entries = zf.read(pth[0]).decode().split()
    assert [Path(e).resolve() for e in entries] == [clone.resolve()]

    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / "xpnet.pth").write_text("\n".join(entries) + "\n")
    # -S: no site-packages of this environment, only the .pth under test
    proc = _python(f"import site; site.addsitedir({str(site_dir)!r}); import xpnet, "
                   "importlib.util; print(xpnet.__file__); "
                   "print(importlib.util.find_spec('xpnet.train').origin)",
                   clone.parent, "-S")
    assert proc.returncode == 0, proc.stderr
    package, train = (Path(line).resolve() for line in proc.stdout.split())
    assert package == (clone / "xpnet" / "__init__.py").resolve()
    assert train == (clone / "xpnet" / "train" / "__init__.py").resolve()  # not train.py

    run = subprocess.run([sys.executable, "train.py", "--help"], cwd=clone,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "usage: train.py" in run.stdout, run.stderr
