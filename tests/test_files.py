"""Atomic writes: a complete file or folder, or the old one, and no work in progress left
behind, even when an interrupt lands just after the work in progress is created."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rmt_deploy import files


def test_a_file_is_replaced_only_when_its_write_succeeds(tmp_path):
    target = tmp_path / "state"
    target.write_text("old")
    with pytest.raises(RuntimeError), files.atomic_path(target) as temp:
        temp.write_text("half")
        raise RuntimeError("the write failed")
    assert target.read_text() == "old"
    with files.atomic_path(target) as temp:
        temp.write_text("new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]


def test_an_interrupt_just_after_the_temporary_file_is_made_leaves_nothing(tmp_path,
                                                                         monkeypatch):
    close = os.close

    def interrupted_close(descriptor):
        close(descriptor)
        raise KeyboardInterrupt  # as a SIGINT handled between the creation and the write

    monkeypatch.setattr(files.os, "close", interrupted_close)
    with pytest.raises(KeyboardInterrupt), files.atomic_path(tmp_path / "state"):
        pass
    assert list(tmp_path.iterdir()) == []


def test_an_interrupt_just_after_the_staging_folder_is_made_leaves_nothing(tmp_path,
                                                                         monkeypatch):
    make = Path.mkdir

    def interrupted_mkdir(self, *args, **kwargs):
        make(self, *args, **kwargs)
        if self.name.startswith(".out.partial-"):  # the staging folder, not its parent
            raise KeyboardInterrupt

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "kept").write_text("the old export")
    monkeypatch.setattr(Path, "mkdir", interrupted_mkdir)
    with pytest.raises(KeyboardInterrupt), files.atomic_folder(tmp_path / "out"):
        pass
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (tmp_path / "out" / "kept").read_text() == "the old export"


def test_only_the_leftovers_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    left = tmp_path / f".state.tmp-{dead}-0123456789ab"
    live = tmp_path / f".state.tmp-{os.getpid()}-0123456789ab"
    other = tmp_path / f".notes.tmp-{dead}-0123456789ab"  # another file's
    for path in (left, live, other):
        path.write_text("work in progress")
    files.remove_leftovers(tmp_path / "state", ("tmp",))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])


def test_an_interrupt_between_the_renames_puts_the_old_folder_back(tmp_path, monkeypatch):
    rename = Path.replace

    def interrupted_replace(self, target):
        if self.name.startswith(".out.partial-"):  # the old one is already moved aside
            raise KeyboardInterrupt
        return rename(self, target)

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "kept").write_text("the old export")
    monkeypatch.setattr(Path, "replace", interrupted_replace)
    with pytest.raises(KeyboardInterrupt), files.atomic_folder(tmp_path / "out") as stage:
        (stage / "new").write_text("the new export")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["kept"]


def test_a_folder_is_replaced_whole_when_its_block_succeeds(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old").write_text("the old export")
    with files.atomic_folder(tmp_path / "out") as stage:
        (stage / "new").write_text("the new export")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["new"]
