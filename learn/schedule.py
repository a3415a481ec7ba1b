"""The cubic density schedule of Zhu & Gupta (2017), shared by
:class:`~learn.GradualPruning` and :class:`~learn.DynamicSparsity` with a target, and
the argument checks of the controllers."""
from __future__ import annotations

import math
import numbers

__all__ = ["cubic_density"]


def cubic_density(step: int, initial_density: float, final_density: float, start_step: int,
                  end_step: int) -> float:
    """Density after step ``step``: ``d_f + (d_i - d_f) * (1 - clamp((step - t0) / (t1 - t0),
    0, 1)) ** 3`` with ``d_i, d_f = initial_density, final_density`` and ``t0, t1 =
    start_step, end_step``; with ``end_step <= start_step`` (no ramp) ``d_f`` from
    ``start_step`` on."""
    if end_step <= start_step:
        return final_density if step >= start_step else initial_density
    progress = min(1.0, max(0.0, (step - start_step) / (end_step - start_step)))
    return final_density + (initial_density - final_density) * (1.0 - progress) ** 3


def check_int(value, name: str, minimum: int) -> int:
    """``value`` as an int >= ``minimum`` (TypeError / ValueError naming ``name``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_fraction(value, name: str) -> float:
    """``value`` as a float in (0, 1] (TypeError / ValueError naming ``name``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"{name} must be a number in (0, 1], got {value!r}")
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return float(value)
