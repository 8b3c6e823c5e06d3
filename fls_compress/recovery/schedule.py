"""Sparsity schedules of gradual pruning.

Zhu & Gupta 2017 ("To prune, or not to prune", eq. 1) raise the sparsity from s_i to s_f over n pruning
steps as

    s_t = s_f + (s_i - s_f) (1 - t / n)^3,    t = 0, 1, ..., n,

pruning fast while many redundant weights remain and slowly near the target, so the fine-tuning between
steps has more time to recover from the last, most damaging removals. ``linear`` is the comparison
schedule s_t = s_i + (s_f - s_i) t / n.
"""

from __future__ import annotations

from ..errors import InvalidOptionError


def sparsity_at(t: int, steps: int, final: float, initial: float = 0.0, kind: str = "cubic") -> float:
    """s_t of the schedule (``t`` in 0..``steps``; s_0 = ``initial``, s_steps = ``final``)."""
    if steps < 1 or not 0 <= t <= steps:
        raise InvalidOptionError(f"schedule step {t} outside 0..{steps}")
    frac = t / steps
    if kind == "cubic":
        return final + (initial - final) * (1.0 - frac) ** 3
    if kind == "linear":
        return initial + (final - initial) * frac
    raise InvalidOptionError(f"unknown sparsity schedule {kind!r}; choose cubic or linear")


def sparsity_schedule(final: float, steps: int, kind: str = "cubic", initial: float = 0.0) -> list[float]:
    """Targets s_1 < ... < s_n = ``final`` of the ``steps`` pruning steps (s_0 = ``initial`` is the start)."""
    out = [sparsity_at(t, steps, final, initial, kind) for t in range(1, steps + 1)]
    out[-1] = final  # exact at the end, whatever the rounding of (1 - 1)^3
    return out
