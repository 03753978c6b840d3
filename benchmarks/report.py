"""docs/benchmarks.md is written by several benchmarks: each owns the part between its
markers and leaves the rest of the page as it is."""

from __future__ import annotations

from pathlib import Path


def markers(name: str) -> tuple[str, str]:
    """The begin and end markers of the ``name`` part (``encoder``, ``decoder``)."""
    return f"<!-- {name} benchmarks: begin -->", f"<!-- {name} benchmarks: end -->"


def write_part(path: Path, name: str, block: str) -> None:
    """Put ``block`` (with its markers) in place of the ``name`` part of ``path``; a page
    without that part gets it at its end."""
    begin, end = markers(name)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)
