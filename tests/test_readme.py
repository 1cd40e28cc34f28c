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
