"""Polygraphy's global logger kept quiet while rmt-deploy calls it: only messages of
``severity`` and above, and no colour probe (it prints a notice on stdout)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def quiet(severity: str = "CRITICAL") -> Iterator[None]:
    """Polygraphy logs only ``severity`` ("WARNING", "ERROR", "CRITICAL") and above."""
    from polygraphy.logger import G_LOGGER

    colors, G_LOGGER.colors = G_LOGGER.colors, False
    try:
        with G_LOGGER.verbosity(getattr(G_LOGGER, severity)):
            yield
    finally:
        G_LOGGER.colors = colors
