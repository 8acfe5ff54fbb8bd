"""The README's examples marked runnable (an HTML comment ``<!-- runnable: ... -->`` on the line
before a python block) run as written, each in a fresh subprocess from a scratch folder."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK = "<!-- runnable: tests/test_readme_examples.py runs this block -->"


def blocks():
    text = open(os.path.join(ROOT, "README.md")).read()
    found = re.findall(re.escape(MARK) + r"\n```python\n(.*?)\n```", text, flags=re.S)
    assert len(found) == text.count(MARK), "a runnable mark not followed by a python block"
    return found


BLOCKS = blocks()


def test_there_are_runnable_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path):
    code = BLOCKS[index]
    if "import transformers" in code:
        pytest.importorskip("transformers")
    # the pyops of this interpreter (an editable or an installed copy), not a folder on sys.path
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"README example {index} failed:\n{code}\n--- stderr ---\n{r.stderr[-4000:]}"
