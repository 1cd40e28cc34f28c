"""The README's operator example runs as written (the pipeline example needs a trained model folder)."""

from __future__ import annotations

import re
from pathlib import Path


def test_readme_python_example_runs(capsys) -> None:
    text = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "the README has no Python example"
    operator_example = next(b for b in blocks if "operator_from_spacings" in b)
    exec(compile(operator_example, "README.md", "exec"), {})
    assert "(64, 64, 16)" in capsys.readouterr().out


def test_readme_paths_exist() -> None:
    """Every repository path the README names (in backticks) is there: no reference to a moved module."""
    root = Path(__file__).parents[1]
    text = (root / "README.md").read_text()
    named = set(re.findall(r"`((?:gen_sr|benchmarks|configs|models|tests|\.ci)/[^`\s…]*)`", text))
    assert "gen_sr/eval/cases.py" in named
    missing = sorted(p for p in named if not any(root.glob(p.rstrip("/"))))
    assert not missing, f"the README names paths that do not exist: {missing}"
