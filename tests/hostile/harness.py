"""The hostile-input harness: each case runs a real console script on files it prepares in a
fresh work folder, and the harness checks that the command

(a) exits with the expected code,
(b) says so in exactly one line on stderr, never a traceback (a usage error, exit
    status 2, in click's usage, a hint and one line naming the bad option),
(c) leaves every file that was in the work folder before as it was (none changed or
    deleted, the export folder and the input included), except those the case says the
    command removes (``removes``: a state rmt-run resumed, which it removes when done),
(d) leaves nothing in its ``TMPDIR`` (a fresh empty folder) and no half-written
    ``.NAME.partial-*`` / ``.NAME.tmp-*`` / ``.NAME.old-*`` in the work folder.

A case is a :class:`Case` in a test module's table: a name, the script, a ``prepare``
function that builds the files from the shared :class:`Assets` and returns the command's
arguments, the exit code and words of the message. Optional: how stdin and stdout are
connected, a signal to send once the command is under way, paths that must not exist
afterwards.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from conftest import make_encoder, write_bert_folder

BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
# rmt-deploy sets the last two itself (so nothing lands in TMPDIR)
for _name in ("RMT_DEBUG", "ORT_DISABLE_TELEMETRY", "TORCHINDUCTOR_CACHE_DIR"):
    ENV.pop(_name, None)
#: 25 words of the tiny encoder's vocabulary: 3 segments.
TEXT = " ".join(f"w{(7 * i) % 45}" for i in range(25)) + "\n"
#: 3,000 segments: a run that takes a few seconds, long enough to be interrupted.
LONG_TEXT = " ".join(f"w{(7 * i) % 45}" for i in range(30_000)) + "\n"
WORK_IN_PROGRESS = re.compile(r"\..+\.(tmp|partial|old)-.*")
TIMEOUT = 180


@dataclass(frozen=True)
class Assets:
    """What cases copy into their work folder (built once; never change these)."""

    checkpoint: Path  # the tiny encoder in rmt-deploy's format, with a tokenizer
    export: Path  # its export folder
    authors: Path  # an authors' BERT model_best.pth ...
    base: Path  # ... and its --base-model folder


@dataclass(frozen=True)
class Scene:
    """A case's work folder (the command's current folder), its home folder beside it,
    and the assets to copy in."""

    work: Path
    home: Path
    assets: Assets

    def export(self, name: str = "good") -> Path:
        return Path(shutil.copytree(self.assets.export, self.work / name))

    def checkpoint(self, name: str = "enc.pt") -> Path:
        return Path(shutil.copy(self.assets.checkpoint, self.work / name))

    def authors(self, folder: str = ".") -> tuple[Path, Path]:
        """``model_best.pth`` and ``base/`` copied into ``folder`` of the work folder."""
        target = self.work / folder
        target.mkdir(parents=True, exist_ok=True)
        return (Path(shutil.copy(self.assets.authors, target / "model_best.pth")),
                Path(shutil.copytree(self.assets.base, target / "base")))

    def text(self, name: str = "ok.txt", text: str = TEXT) -> Path:
        path = self.work / name
        path.write_text(text)
        return path


@dataclass(frozen=True)
class Interrupt:
    """Send ``signal`` once ``ready(work)`` holds (the command is under way)."""

    ready: Callable[[Path], bool]
    signal: int = signal.SIGTERM


@dataclass(frozen=True)
class Case:
    name: str
    script: str  # a console script: rmt-run, rmt-export, ...
    prepare: Callable[[Scene], Sequence[str | Path]]  # builds the files; the arguments
    code: int = 1
    says: tuple[str, ...] = ()  # words of the one line on stderr
    stdin: bytes | None = b""  # None: closed
    stdout: str = "pipe"  # "pipe", "closed", "read-only" or "broken" (reader gone)
    interrupt: Interrupt | None = None
    absent: tuple[str, ...] = ()  # paths (relative to the work folder) left not existing
    removes: tuple[str, ...] = ()  # files of the tool's own it must remove (a resumed state)
    env: Callable[[Scene], dict[str, str | None]] | None = None  # changes (None: unset)

    def __str__(self) -> str:
        return self.name


def build_assets(checkpoint: Path, export: Path, folder: Path) -> Assets:
    """The shared assets: the session's checkpoint and export, and an authors' BERT
    checkpoint with its base folder written to ``folder``."""
    source = make_encoder(seed=5)
    m, vocab = source.rmt_config.num_mem_tokens, source.rmt_config.vocab_size
    state = {"cls_token": torch.tensor([2]), "sep_token": torch.tensor([3]),
             "mem_token_ids": torch.arange(vocab - m, vocab)}
    state.update({k: v.clone() for k, v in source.state_dict().items()})
    state["model.embeddings.weight"] = state["model.bert.embeddings.word_embeddings.weight"]
    folder.mkdir(parents=True, exist_ok=True)
    authors = folder / "model_best.pth"
    torch.save({"model_state_dict": state, "epoch": 1}, authors)
    return Assets(checkpoint, export, authors, write_bert_folder(folder / "bert-base"))


def fingerprint(folder: Path) -> dict[str, str]:
    """Every entry under ``folder``: a file's sha256, a link's target, a folder's mark."""
    entries = {}
    for root, folders, files in os.walk(folder):
        for name in folders + files:
            path = Path(root, name)
            key = str(path.relative_to(folder))
            if path.is_symlink():
                entries[key] = "-> " + os.readlink(path)
            elif path.is_dir():
                entries[key] = "folder"
            else:
                entries[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return entries


def run_case(case: Case, root: Path, assets: Assets) -> subprocess.CompletedProcess:
    """Prepare, run and check ``case`` in ``root`` (an empty folder); returns the process
    for further checks."""
    scene = Scene(root / "work", root / "home", assets)
    tmp = root / "tmp"
    for folder in (scene.work, scene.home, tmp):
        folder.mkdir()
    args = [str(a) for a in case.prepare(scene)]
    before = fingerprint(scene.work)
    env = {**ENV, "TMPDIR": str(tmp), "HOME": str(scene.home),
           **(case.env(scene) if case.env else {})}
    proc = _run([str(BIN / case.script), *args], case, scene.work,
                {key: value for key, value in env.items() if value is not None})
    stderr = proc.stderr.decode(errors="replace")
    assert proc.returncode == case.code, (proc.returncode, stderr)
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    if case.code == 0:
        assert stderr == "", stderr
    elif case.code == 2:  # click's usage error: usage, a hint, one line naming the option
        errors = [line for line in lines if line.startswith("Error: Invalid value for")]
        assert lines[0].startswith("Usage: ") and len(errors) == 1, stderr
    else:
        assert len(lines) == 1 and lines[0].strip(), stderr
        assert lines[0].startswith(f"{case.script}: "), lines[0]
    for words in case.says:
        assert words in stderr, (words, stderr)
    after = fingerprint(scene.work)
    changed = sorted(key for key, value in before.items()
                     if after.get(key) != value and key not in case.removes)
    assert not changed, f"changed or deleted: {changed}"
    left = sorted(key for key in after if WORK_IN_PROGRESS.fullmatch(Path(key).name))
    assert not left, f"work in progress left behind: {left}"
    assert list(tmp.iterdir()) == [], f"left in TMPDIR: {sorted(os.listdir(tmp))}"
    for path in case.absent + case.removes:
        assert not (scene.work / path).exists(), f"{path} was created"
    return proc


def _run(command: list[str], case: Case, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    process = subprocess.Popen(
        command, cwd=cwd, env=env, stdin=subprocess.PIPE if case.stdin is not None else None,
        stdout=subprocess.PIPE if case.stdout in ("pipe", "broken") else None,
        stderr=subprocess.PIPE, preexec_fn=_streams(case))
    if case.stdout == "broken":
        process.stdout.close()  # the reader is gone before the command writes
    if case.interrupt is not None:
        _interrupt(process, case.interrupt, cwd)
    try:
        out, err = process.communicate(case.stdin if case.stdin else None, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return subprocess.CompletedProcess(command, process.returncode, out or b"", err)


def _streams(case: Case) -> Callable[[], None]:
    """What the child does with its stdin and stdout before it starts; SIGINT is given
    its default action, as at a terminal (a shell's background job, such as a CI run
    started with ``&``, would pass it on ignored)."""
    def prepare() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if case.stdin is None:
            os.close(0)
        if case.stdout == "closed":
            os.close(1)
        elif case.stdout == "read-only":
            os.dup2(os.open(os.devnull, os.O_RDONLY), 1)

    return prepare


def _interrupt(process: subprocess.Popen, interrupt: Interrupt, work: Path) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not interrupt.ready(work):
        assert process.poll() is None, "the command ended before it could be interrupted"
        assert time.monotonic() < deadline, "the command never got under way"
        time.sleep(0.005)
    process.send_signal(interrupt.signal)


def staging(work: Path, name: str, holding: str | None = None) -> bool:
    """Whether ``.NAME.partial-*`` exists in ``work`` (and holds ``holding``)."""
    return any((holding is None or (stage / holding).exists())
               for stage in work.glob(f".{name}.partial-*"))
