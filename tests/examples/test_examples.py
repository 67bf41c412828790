"""Every tutorial in `examples/` runs end to end at its toy size, so no example can rot.

Each example is run as its users run it (`python examples/NAME.py`, a fresh interpreter) with
`TL_CODEBOOK_EXAMPLE_SIZE=toy` and `TL_CODEBOOK_EXAMPLE_OUT` pointing into a temporary folder.
The examples check their own known answers with `assert`; here we check that they exit cleanly,
that they are notebooks in jupytext's percent format with a title, and that every figure they
write is a real image with something drawn on it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jupytext
import matplotlib.image
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.py") if not p.name.startswith("_"))


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 6, [p.name for p in EXAMPLES]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_is_a_percent_format_notebook_with_a_title(path: Path) -> None:
    notebook = jupytext.read(path, fmt="py:percent")
    kinds = [cell.cell_type for cell in notebook.cells]
    assert kinds[0] == "markdown" and notebook.cells[0].source.startswith("# "), path.name
    assert "code" in kinds and kinds.count("markdown") >= 3, (path.name, kinds)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs_at_toy_size(path: Path, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "TL_CODEBOOK_EXAMPLE_SIZE": "toy",
        "TL_CODEBOOK_EXAMPLE_OUT": str(tmp_path),
        "MPLBACKEND": "Agg",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        [sys.executable, str(path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, (
        f"{path.name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    )
    for figure in tmp_path.rglob("*.png"):
        pixels = matplotlib.image.imread(figure)
        assert pixels.ndim == 3 and min(pixels.shape[:2]) >= 100, figure
        assert float(np.std(pixels[..., :3])) > 0.01, f"{figure} is blank"
