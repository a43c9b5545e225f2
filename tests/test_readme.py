"""Every Python example in README.md and docs/*.md runs as written (each block on its own, in a
temporary working directory).  Blocks that import cupy or torch show GPU pipelines: they run only
with a GPU (``-m gpu``)."""
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def blocks():
    out = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 2
            name = f"{path.relative_to(ROOT)}:{line}"
            code = match.group(1)
            marks = [pytest.mark.gpu] if re.search(r"^import (cupy|torch)\b", code, re.M) else []
            out.append(pytest.param(name, code, id=name, marks=marks))
    return out


BLOCKS = blocks()


def test_readme_has_examples():
    assert len([b for b in BLOCKS if b.values[0].startswith("README.md")]) >= 3


@pytest.mark.parametrize("name, code", BLOCKS)
def test_example_runs(name, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # as a script: blocks guarded by `if __name__ == "__main__":` (Dask's spawned workers) run too
    exec(compile(code, name, "exec"), {"__name__": "__main__"})


SCRIPTS = [b for b in BLOCKS if 'if __name__ == "__main__":' in b.values[1]]


def test_dask_examples_are_guarded():
    assert any(b.values[0].startswith("README.md") for b in SCRIPTS)


@pytest.mark.parametrize("name, code", SCRIPTS)
def test_guarded_example_runs_as_a_script_file(name, code, tmp_path):
    """The README's Dask block pasted into a script failed: spawned workers re-import the script, so
    it needs the __main__ guard, which the block now carries; run as a real file, as a user would."""
    script = tmp_path / "example.py"
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
