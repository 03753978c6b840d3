"""Where a command may write a file (``--convert``, ``--state-file``, ``--plot``,
``--timing-cache``): never over one of its inputs, never inside an export folder or another
protected folder, never over an existing file the command did not write (unless the
user says ``--overwrite``), never below a folder that does not exist."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from rmt_deploy.errors import InputError
from rmt_deploy.files import is_within, same_file
from rmt_deploy.manifest import MANIFEST_NAME


def check_output_file(path: Path, option: str, *, example: str,
                      inputs: Mapping[str, Path | None] = {},  # noqa: B006 - read only
                      folders: Mapping[str, Path | None] = {},  # noqa: B006 - read only
                      ours: Callable[[Path], bool] | None = None, mine: str = "",
                      overwrite: bool | None = None, reused: bool = False) -> None:
    """Refuse ``path`` as the file ``option`` writes (and may later replace or delete)
    when it is a folder; one of ``inputs`` (what it is -> file, links and hard links
    resolved); inside an export folder or one of ``folders`` (what -> folder); an
    existing file that ``ours`` does not recognize as ``mine`` (what the command
    writes), unless ``overwrite`` (None: the command has no --overwrite flag) or the file
    is ``reused`` (read, then updated: a cache); or a path whose folder does not exist.
    ``example`` is a file name to suggest."""
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give {option} a file name such as {example}")
    for what, read in inputs.items():
        if read is not None and same_file(path, read):
            raise InputError(f"{path}: is {what}; give {option} another file name such as "
                             f"{example}")
    export = export_folder_of(path)
    if export is not None:
        raise InputError(f"{path}: is inside the export folder {export}; give {option} a file "
                         "outside it")
    for what, folder in folders.items():
        if folder is not None and is_within(path, folder):
            raise InputError(f"{path}: is inside {what} {folder}; give {option} a file outside "
                             "it")
    if path.exists() and not reused and not overwrite and (ours is None or not ours(path)):
        raise InputError(f"{path}: exists" + (f" and is not {mine}" if ours else "") + "; "
                         + ("pass --overwrite to replace it or " if overwrite is False else "")
                         + "choose another file name")
    check_folder_exists(path)


def export_folder_of(path: Path) -> Path | None:
    """The export folder (a folder holding rmt.json) that ``path`` lies in, if any."""
    return next((folder for folder in path.resolve().parents
                 if (folder / MANIFEST_NAME).is_file()), None)


def check_folder_exists(path: Path) -> None:
    """Refuse a file whose folder does not exist (or is a file): no folder is made
    unasked."""
    folder = path.absolute().parent
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise InputError(f"{path}: its folder {folder} {what}; create the folder first or "
                         "choose another path")
