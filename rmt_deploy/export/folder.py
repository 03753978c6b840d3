"""Where rmt-export may write: an export folder replaces only an earlier export that
holds nothing else, and no output covers the tool's own inputs, the current folder or
the home folder; ``--convert`` writes no file it was not asked to replace."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from rmt_deploy.errors import RmtError
from rmt_deploy.files import is_leftover, is_within
from rmt_deploy.manifest import MANIFEST_FORMAT, MANIFEST_NAME
from rmt_deploy.outputs import check_output_file

SHOWN = 3  # names of foreign files an error message lists


def check_target(out: Path, sources: Iterable[Path | None] = ()) -> None:
    """Refuse an export folder that would replace what rmt-export did not write: a file,
    a folder holding anything but an earlier export's files, one of ``sources`` (the
    checkpoint, the base model, ...) or a folder above them, the current folder, the home
    folder, or a folder above either."""
    _refuse_above_work(out)
    _refuse_sources(out, sources)
    if out.exists() and not out.is_dir():
        raise RmtError(f"{out}: exists and is a file; choose another -o folder")
    foreign = foreign_files(out) if out.is_dir() else []
    if foreign and not _listed_files(out / MANIFEST_NAME):
        raise RmtError(f"{out}: is not an rmt-export folder (it holds {_names(foreign)}); "
                       "choose another -o folder or empty it")
    if foreign:
        raise RmtError(f"{out}: holds {_names(foreign)}, which rmt-export did not write; "
                       "move them out or choose another -o folder")
    check_parents(out)


def foreign_files(folder: Path) -> list[str]:
    """What ``folder`` holds besides an export's files (``rmt.json`` and every file it
    names), relative to it; everything when it holds no rmt-export manifest. Work left
    by killed rmt-deploy processes is not counted."""
    listed = _listed_files(folder / MANIFEST_NAME)
    foreign = []
    for root, folders, files in os.walk(folder):
        here = Path(root)
        inside = []
        for name in folders:
            path = here / name
            if is_leftover(path):
                continue
            if path.is_symlink() or not any(path.iterdir()):
                foreign.append(path.relative_to(folder).as_posix() + "/")
            else:
                inside.append(name)
        folders[:] = inside
        for name in files:
            relative = (here / name).relative_to(folder).as_posix()
            if relative not in listed and not is_leftover(here / name):
                foreign.append(relative)
    return sorted(foreign)


def check_file_target(out: Path, source: Path, base_model: Path | None,
                      overwrite: bool) -> None:
    """Refuse a ``--convert`` output that is its own input, lies in an export folder or
    the base model, is a folder, exists (unless ``overwrite``) or has no folder."""
    check_output_file(out, "--convert", example="model.pt",
                      inputs={"the checkpoint being converted": source},
                      folders={"the base model": base_model}, overwrite=overwrite)


def check_parents(path: Path) -> None:
    """Refuse a path below a file: it could never be created."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise RmtError(f"{path}: {parent} is a file, not a folder; choose another "
                               "path")
            return


def _refuse_above_work(out: Path) -> None:
    home = Path(os.path.expanduser("~"))
    folders = [(Path.cwd().resolve(), "the current folder")]
    if home.is_absolute():
        folders.append((home.resolve(), "the home folder"))
    for folder, what in folders:
        if is_within(folder, out):
            raise RmtError(f"{out}: is {what} or a folder above it, which an export would "
                           "replace whole; give -o a new folder such as model-export")


def _refuse_sources(out: Path, sources: Iterable[Path | None]) -> None:
    for source in sources:
        if source is not None and is_within(source, out):
            raise RmtError(f"{out}: is or holds {source}, an input of this export, which "
                           "the export would replace; give -o another folder")


def _listed_files(manifest: Path) -> set[str]:
    """An rmt-export manifest's name and every ``"file"`` value anywhere in it; nothing
    if it is not one."""
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return set()
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        return set()
    return {MANIFEST_NAME, *(Path(value).as_posix() for value in _file_values(data))}


def _file_values(data: Any) -> Iterator[str]:
    if isinstance(data, dict):
        for key, value in data.items():
            if key == "file" and isinstance(value, str):
                yield value
            else:
                yield from _file_values(value)
    elif isinstance(data, list):
        for value in data:
            yield from _file_values(value)


def _names(paths: list[str]) -> str:
    shown = ", ".join(paths[:SHOWN])
    return shown if len(paths) <= SHOWN else f"{shown} +{len(paths) - SHOWN} more"
