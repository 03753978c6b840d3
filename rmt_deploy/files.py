"""Writing files and folders so that a failure or a kill never leaves a half-written
one where a complete one is expected. Also file hashing. Standard library only.

Work in progress is a hidden sibling named ``.NAME.TAG-PID-RANDOM`` (TAG: ``tmp``,
``partial`` or ``old``); one whose process is gone (killed with SIGKILL) is removed by
the next write of the same NAME."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

_HIDDEN = re.compile(r"\.(?P<name>.+)\.(?P<tag>tmp|partial|old)-(?P<pid>[1-9][0-9]*)-"
                     r"[0-9a-f]{12}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def cache_folder() -> Path | None:
    """rmt-deploy's cache folder: ``RMT_DEPLOY_CACHE_DIR``, else ``$XDG_CACHE_HOME/rmt-deploy``
    (an absolute path), else ``$HOME/.cache/rmt-deploy``; None where no folder can be named:
    HOME unset, empty, relative or ``/`` (never ``/.cache``)."""
    if os.environ.get("RMT_DEPLOY_CACHE_DIR"):
        return Path(os.environ["RMT_DEPLOY_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):
        return Path(xdg) / "rmt-deploy"
    home = os.environ.get("HOME", "")
    if not os.path.isabs(home) or Path(home).resolve() == Path("/"):
        return None
    return Path(home) / ".cache" / "rmt-deploy"


def can_create(path: str | Path) -> bool:
    """Whether ``path`` is a folder this process may write in, or could be made one (its
    nearest existing ancestor is a writable folder). Nothing is created."""
    path = Path(path).absolute()
    while not path.exists():
        if path.is_symlink() or path == path.parent:  # a dangling link; the root
            return False
        path = path.parent
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file (through links, ``..``, hard links)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return Path(a).resolve() == Path(b).resolve()


def is_within(path: str | Path, folder: str | Path) -> bool:
    """Whether ``path`` is ``folder`` or lies below it, links and ``..`` resolved."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def _hidden_sibling(path: Path, tag: str) -> Path:
    return path.parent / f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OverflowError:  # too large to be a pid: not ours to judge, so kept
        return True
    return True


def is_leftover(path: str | Path) -> bool:
    """Whether ``path`` is the work in progress of a process that is gone."""
    match = _HIDDEN.fullmatch(Path(path).name)
    return match is not None and not _alive(int(match["pid"]))


def remove_leftovers(path: str | Path, tags: tuple[str, ...]) -> None:
    """Remove the hidden siblings of ``path`` with one of ``tags`` left by dead processes;
    nothing else is touched."""
    path = Path(path)
    try:
        siblings = list(path.parent.iterdir())
    except OSError:  # best effort: a folder that cannot be listed keeps its leftovers
        return
    for sibling in siblings:
        match = _HIDDEN.fullmatch(sibling.name)
        if (match is None or match["name"] != path.name or match["tag"] not in tags
                or _alive(int(match["pid"]))):
            continue
        if sibling.is_dir() and not sibling.is_symlink():
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):  # another user's, say
                sibling.unlink()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; it replaces ``path`` when the
    block succeeds and is removed when it fails. The file gets the umask's usual mode."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path, ("tmp",))
    temp = _hidden_sibling(path, "tmp")  # a name of this process's own
    try:  # created inside: an interrupt just after the creation still removes it
        os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        yield temp
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(out: str | Path, check: Callable[[], None] | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; it replaces ``out`` (and whatever was
    there) when the block succeeds and is removed when it fails. ``check`` runs just
    before the replacement; raising there keeps ``out`` as it is."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out, ("partial", "old"))
    stage = _hidden_sibling(out, "partial")  # a name of this process's own
    old = _hidden_sibling(out, "old")
    try:  # made inside: an interrupt just after the mkdir still removes it
        stage.mkdir(mode=0o777 & ~_umask())
        yield stage
        if check is not None:
            check()
        if out.exists():
            out.replace(old)
        stage.replace(out)
    finally:
        if old.exists() and not out.exists():  # stopped between the two renames
            old.replace(out)
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
        if old.exists():  # replaced: the old folder goes
            shutil.rmtree(old, ignore_errors=True)
