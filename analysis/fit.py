"""Least-squares fits of memory against connection counts: y = c0 + c1 x1 + c2 x2 ...

Used across recordings (`idlebuf sweep`: memory against idle and active connections).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LinearFit:
    intercept: float
    slopes: dict[str, float]  # per regressor; NaN where the points cannot separate it
    r2: float | None  # None when the points are no more than the coefficients (exact by force)
    points: int


def linear_fit(regressors: dict[str, np.ndarray], y: np.ndarray) -> LinearFit:
    """Fit y on an intercept and each regressor, in order. A regressor after the first is
    left out (its slope NaN) when it is a linear combination of the ones before it, or when
    adding it would leave the fit no spare point to be judged by: the points cannot tell it
    apart."""
    y = np.asarray(y, dtype=float)
    columns = [np.ones_like(y)]
    used: list[str] = []
    for name, x in regressors.items():
        candidate = np.column_stack([*columns, np.asarray(x, dtype=float)])
        separable = np.linalg.matrix_rank(candidate) == candidate.shape[1]
        if separable and (not used or len(y) > candidate.shape[1]):
            columns.append(np.asarray(x, dtype=float))
            used.append(name)
    design = np.column_stack(columns)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    predicted = design @ coef
    spread = float(((y - y.mean()) ** 2).sum())
    if len(y) <= design.shape[1]:
        r2 = None
    else:
        r2 = 1 - float(((y - predicted) ** 2).sum()) / spread if spread else 1.0
    slopes = {name: float("nan") for name in regressors}
    slopes.update({name: float(c) for name, c in zip(used, coef[1:])})
    return LinearFit(float(coef[0]), slopes, r2, len(y))
