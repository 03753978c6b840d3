"""The README's Python API example runs as written (on the demo model) and answers what
the README says it prints."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "demo-rmt.pt"


def api_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return next(block for block in blocks if "open_model(" in block)


@pytest.mark.skipif(not DEMO.exists(), reason="examples/demo-rmt.pt not committed")
def test_the_readme_api_example_runs_on_the_demo_model(tmp_path):
    # the demo checkpoint stands in for its export: open_model takes either
    code = api_example().replace('open_model("model-export")', f"open_model({str(DEMO)!r})")
    assert str(DEMO) in code
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={"PYTHONPATH": str(ROOT),
                                                       "OMP_NUM_THREADS": "1",
                                                       "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:3] == ["garden 1.0", "kitchen 1.0", "hallway 1.0"], done.stdout
    assert lines[3].endswith("tokens/s on torch")
