"""Per-output tolerances judged by Polygraphy: each open-loop step's outputs of the
reference and the candidate (paired by :func:`rmt_deploy.export.comparator.compare`) go
to ``SimpleCompareFunc`` (``CompareFunc.simple``), which passes an output when its
largest absolute error is within its atol or its largest relative error within its
rtol."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

DEFAULT_ATOL = 1e-5  # Polygraphy's, for outputs the atol mapping does not name


class PolygraphyJudge:
    """An :data:`~rmt_deploy.export.comparator.OutputJudge`: ``atol``/``rtol`` per output
    name, ``""`` the default (Polygraphy's syntax)."""

    def __init__(self, atol: Mapping[str, float], rtol: Mapping[str, float]) -> None:
        from polygraphy.comparator import SimpleCompareFunc

        self.atol, self.rtol = dict(atol), dict(rtol)
        self._compare = SimpleCompareFunc(atol=self.atol, rtol=self.rtol,
                                          check_error_stat="max")

    def atol_of(self, name: str) -> float:
        """The atol ``name`` is judged with."""
        return self.atol.get(name, self.atol.get("", DEFAULT_ATOL))

    def __call__(self, expected: Mapping[str, np.ndarray], actual: Mapping[str, np.ndarray]
                 ) -> dict[str, bool]:
        from polygraphy.comparator.struct import IterationResult

        from rmt_deploy.export.polygraphy_log import quiet

        with quiet():
            results = self._compare(
                IterationResult({k: np.ascontiguousarray(v) for k, v in expected.items()},
                                runner_name="reference"),
                IterationResult({k: np.ascontiguousarray(v) for k, v in actual.items()},
                                runner_name="candidate"))
        return {name: bool(result) for name, result in results.items()}
