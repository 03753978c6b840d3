"""Errors of the serving layer: user errors with one-line messages, like the rest."""

from rmt_deploy.errors import RmtError


class ServingError(RmtError):
    """A Triton repository, server or request cannot be used as asked."""


class StateFileError(ServingError):
    """A client's saved progress cannot be resumed (damaged, or for another model)."""


class SequenceLostError(ServingError):
    """The server that held a sequence is gone, restarted, or unreachable: the segment can
    be sent again as a START with the client's last state (serving/failover.py)."""
