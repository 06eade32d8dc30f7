"""The project's own promises: README's commands and CI agree."""

from pathlib import Path

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
    assert first_two[0].endswith("python train.py")
