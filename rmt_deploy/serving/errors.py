"""Errors of the serving layer: user errors with one-line messages, like the rest."""

from rmt_deploy.errors import RmtError


class ServingError(RmtError):
    """A Triton repository, server or request cannot be used as asked."""


class StateFileError(ServingError):
    """A client's saved progress cannot be resumed (damaged, or for another model)."""
