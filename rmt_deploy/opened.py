"""An export folder's files, each opened once and hashed from its handle when the folder
is opened. Later reads go through the same handles, so a folder (or a file) replaced
under a running process leaves the process on the files it opened; a file changed in
place fails the read. Standard library only."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import mmap
import os
import stat
import weakref
from dataclasses import dataclass
from pathlib import Path

from rmt_deploy.errors import ManifestError

BLOCK = 1 << 20  # bytes hashed at a time


@dataclass(frozen=True)
class _File:
    fd: int
    sha256: str
    identity: tuple[int, ...]  # device, inode, size, mtime and ctime when it was hashed


def _identity(info: os.stat_result) -> tuple[int, ...]:
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def _close(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()


class OpenedFolder:
    """The files of ``folder``, opened through one handle on the folder (so they all come
    from the same folder even if it is renamed meanwhile) and kept open until
    :meth:`close` (or garbage collection)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._files: dict[str, _File] = {}
        self._fds: list[int] = []
        self._finalizer = weakref.finalize(self, _close, self._fds)
        try:
            self._dir: int | None = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as error:
            raise ManifestError(f"{folder}: cannot be opened ({error.strerror}); pass a "
                                "folder written by rmt-export") from None
        self._fds.append(self._dir)

    def open(self, name: str, max_bytes: int | None = None) -> str:
        """Open the plain file ``name`` of the folder (once) and return its sha256."""
        if name in self._files:
            return self._files[name].sha256
        path = self.folder / name
        if self._dir is None:
            raise ManifestError(f"{path}: not opened with its export folder; open it again")
        try:  # O_NONBLOCK: a FIFO planted under a file's name must not hang the open
            fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK, dir_fd=self._dir)
        except OSError as error:
            if error.errno in (errno.ENOENT, errno.ENOTDIR):
                raise ManifestError(f"{path}: missing from the export folder; re-export the "
                                    "model") from None
            raise ManifestError(f"{path}: cannot be read ({error.strerror}); check its "
                                "permissions or re-export the model") from None
        self._fds.append(fd)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ManifestError(f"{path}: not a file; re-export the model")
        if max_bytes is not None and info.st_size > max_bytes:
            raise ManifestError(f"{path}: {info.st_size:,} bytes, too large to be a manifest; "
                                "re-export the model")
        digest = hashlib.sha256()
        offset = 0
        while block := os.pread(fd, BLOCK, offset):
            digest.update(block)
            offset += len(block)
        self._files[name] = _File(fd, digest.hexdigest(), _identity(info))
        return self._files[name].sha256

    def seal(self) -> None:
        """Open no more files (the folder's own handle is closed)."""
        if self._dir is not None:
            self._fds.remove(self._dir)
            os.close(self._dir)
            self._dir = None

    def sha256(self, name: str) -> str:
        return self._file(name).sha256

    def read(self, name: str) -> bytes:
        """The bytes of ``name`` as it was opened (hashed again); a file changed in place
        since is an error."""
        file = self._file(name)
        size, blocks, done = os.fstat(file.fd).st_size, [], 0
        while done < size and (block := os.pread(file.fd, min(size - done, 1 << 30), done)):
            blocks.append(block)  # a read returns at most about 2 GB
            done += len(block)
        data = blocks[0] if len(blocks) == 1 else b"".join(blocks)
        if hashlib.sha256(data).hexdigest() != file.sha256:
            raise self._changed(name)
        return data

    def size(self, name: str) -> int:
        return self._file(name).identity[2]

    def mapped(self, name: str) -> mmap.mmap:
        """A copy-on-write map of ``name`` as it was opened (not hashed again: its size,
        modification and change times must be those it was hashed with)."""
        file = self._file(name)
        if _identity(os.fstat(file.fd)) != file.identity:
            raise self._changed(name)
        return mmap.mmap(file.fd, 0, access=mmap.ACCESS_COPY)

    def check_paths(self, names: list[str]) -> None:
        """Refuse when a path of the folder no longer names the file opened under it, or
        that file changed since: for libraries that can only read by path, before and
        after they read."""
        for name in names:
            file = self._file(name)
            try:
                now = _identity(os.stat(self.folder / name))
            except OSError:
                now = ()
            if now != file.identity or _identity(os.fstat(file.fd)) != file.identity:
                raise self._changed(name)

    def close(self) -> None:
        self._dir = None
        self._finalizer()

    def _file(self, name: str) -> _File:
        if name not in self._files:
            raise ManifestError(f"{self.folder / name}: not a file the manifest lists")
        return self._files[name]

    def _changed(self, name: str) -> ManifestError:
        return ManifestError(f"{self.folder / name}: changed or replaced since the model was "
                             "opened; open the model again (re-export it if it was damaged)")
