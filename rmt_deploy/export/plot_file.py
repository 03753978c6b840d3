"""Where ``rmt-compare --plot`` may write: a new ``.png`` file beside the compared
artifacts, or a plot rmt-compare wrote before, which it proves by the PNG signature and
the text chunk :data:`PLOT_METADATA` that it writes into every plot. Checked before the
comparison runs, like matplotlib's presence."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from pathlib import Path

from rmt_deploy.errors import InputError
from rmt_deploy.outputs import check_output_file

#: PNG text chunk written into every drift plot (``savefig(metadata=...)``).
PLOT_METADATA = {"rmt-deploy": "rmt-compare drift plot"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_plot_target(path: Path, artifacts: Iterable[Path], base_model: Path | None,
                      overwrite: bool) -> None:
    """Refuse ``--plot PATH`` before any work: without matplotlib; one of the compared
    ``artifacts``, inside an export folder or the base model; an existing file that is
    not a drift plot (unless ``overwrite``); a missing folder; a name not ``.png``."""
    if importlib.util.find_spec("matplotlib") is None:
        raise InputError("--plot needs matplotlib: pip install 'rmt-deploy[plot]'")
    check_output_file(path, "--plot", example="drift.png",
                      inputs={f"{artifact}, an artifact being compared": artifact
                              for artifact in artifacts},
                      folders={"the base model": base_model},
                      ours=is_drift_plot, mine="a plot rmt-compare wrote", overwrite=overwrite)
    if path.suffix.lower() != ".png":
        raise InputError(f"{path}: --plot writes PNG; give a file name ending in .png such as "
                         "drift.png")


def is_drift_plot(path: Path) -> bool:
    """Whether ``path`` is a PNG holding :data:`PLOT_METADATA` among its text chunks."""
    try:
        with open(path, "rb") as handle:
            if handle.read(len(PNG_SIGNATURE)) != PNG_SIGNATURE:
                return False
        from PIL import Image  # matplotlib's own dependency

        with Image.open(path) as image:
            return all(image.info.get(key) == value for key, value in PLOT_METADATA.items())
    except (OSError, SyntaxError, ValueError):  # unreadable or damaged: not a plot of ours
        return False
