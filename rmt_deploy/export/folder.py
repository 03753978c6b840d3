"""Where an export folder may be written."""

from __future__ import annotations

from pathlib import Path

from rmt_deploy.errors import RmtError
from rmt_deploy.manifest import MANIFEST_NAME


def check_target(out: Path) -> None:
    """Refuse a target that exists and is not an export folder (nothing is overwritten
    that rmt-export did not write)."""
    if out.exists() and not out.is_dir():
        raise RmtError(f"{out}: exists and is a file; choose another -o folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
        raise RmtError(f"{out}: exists and is not an rmt-export folder; choose another -o "
                       "folder or empty it")
    check_parents(out)


def check_parents(path: Path) -> None:
    """Refuse a path below a file: it could never be created."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise RmtError(f"{path}: {parent} is a file, not a folder; choose another "
                               "path")
            return
