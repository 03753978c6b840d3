"""Backends run one segment step; the loop in ``runtime.loop`` is shared by all."""
