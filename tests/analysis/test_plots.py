"""The plots: importing them leaves the user's matplotlib backend alone, and each plot writes a
PNG file whatever backend is set (none, or a non-interactive one)."""

import os
import subprocess
import sys

from tl_codebook.analysis.plots import (
    plot_code_label_heatmap,
    plot_grouped_bars,
    plot_precision_recall_bars,
    plot_training_curves,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_importing_the_plots_keeps_the_users_backend():
    code = (
        "import matplotlib; matplotlib.use('svg'); "
        "import tl_codebook.analysis.plots; print(matplotlib.get_backend())"
    )
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert result.stdout.strip() == "svg"


def test_each_plot_writes_a_png_file(tmp_path):
    written = [
        plot_training_curves(
            {"a": [3.0, 2.0, 1.0], "b": [2.5, 1.5]},
            tmp_path / "curves.png",
            reference={"floor": 0.9},
            steps={"b": [10, 20]},
            zoom=(0.8, 1.2),
        ),
        plot_code_label_heatmap(
            [[0.1, 0.9], [1.0, 0.0]], tmp_path / "heat.png", ["c0", "c1"], ["s0", "s1"]
        ),
        plot_precision_recall_bars(["s0", "s1"], [1.0, 0.5], [0.9, 0.2], tmp_path / "pr.png"),
        plot_grouped_bars({"g": {"x": 0.5, "y": 0.2}}, tmp_path / "sub" / "bars.png"),
    ]
    for path in written:
        assert path.read_bytes().startswith(PNG_MAGIC), path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "heat.png", "pr.png", "sub"]
