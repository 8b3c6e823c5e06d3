"""Shrinkage of the GPTQ layer Hessian when the calibration rows are few for the layer's width.

GPTQ minimises ||(W_q - W) X^T||^2 over the calibration rows X (n x p): H = 2 X^T X / n is the sample
estimate of 2 E[x x^T]. When n is not much larger than p (a 4096-wide MLP layer calibrated on 512
samples: H has rank <= 512), the OBS updates move the weights freely along the directions the calibration
rows do not span, and the rounding error on new inputs grows: on the benchmark's wide MLP, GPTQ on the
raw H is worse than round-to-nearest on held-out inputs (docs/design/w8a8.md).

``oas``: E[x x^T] = C + mu mu^T is estimated with the mean mu kept and the covariance C replaced by the
oracle-approximating shrinkage estimator (Chen, Wiesel, Eldar, Hero, "Shrinkage algorithms for MMSE
covariance estimation", IEEE Trans. Signal Process. 2010, eq. 23):

    rho = min(1, ((1 - 2/p) tr(S^2) + tr(S)^2) / ((n + 1 - 2/p) (tr(S^2) - tr(S)^2 / p))),
    C_hat = (1 - rho) S + rho tr(S)/p I,

S the sample covariance. rho -> 0 when n >> p (H unchanged up to O(p/n)); a layer whose calibration rows
cannot pin down its covariance is pulled towards the isotropic target, for which GPTQ reduces to
round-to-nearest (H proportional to I: no compensation).
"""

from __future__ import annotations

import torch

from ..errors import InvalidOptionError
from ..io.layer_rows import RowStatistics

SHRINKAGE = ("oas", "none")


def oas_coefficient(cov: torch.Tensor, n: int) -> float:
    """OAS's rho for a p x p sample covariance from n rows (eq. 23 of Chen et al. 2010)."""
    p = cov.shape[0]
    tr = float(torch.trace(cov))
    tr2 = float(torch.linalg.vector_norm(cov)) ** 2
    denom = (n + 1.0 - 2.0 / p) * (tr2 - tr * tr / p)
    if p < 2 or denom <= 0.0:  # already isotropic (or one column): shrinking changes nothing
        return 1.0 if p >= 2 else 0.0
    return float(min(1.0, ((1.0 - 2.0 / p) * tr2 + tr * tr) / denom))


def layer_hessian(stats: RowStatistics, group: int, shrinkage: str) -> tuple[torch.Tensor, float]:
    """H = 2 E[x x^T] of one layer group, raw (``none``) or with the covariance part shrunk (``oas``),
    and the shrinkage coefficient used."""
    if shrinkage not in SHRINKAGE:
        raise InvalidOptionError(f"hessian shrinkage must be one of {', '.join(SHRINKAGE)}, got {shrinkage!r}")
    h = stats.hessian(group)
    n = int(stats.rows_used)
    if shrinkage == "none" or n < 2:
        return h, 0.0
    mu = stats.sum[group] / n
    outer = torch.outer(mu, mu)
    cov = h.mul_(0.5).sub_(outer)  # in place: h is this call's own tensor (p x p float64, one copy)
    p = cov.shape[0]
    rho = oas_coefficient(cov, n)
    target = rho * float(torch.trace(cov)) / p
    cov.mul_(1.0 - rho).diagonal().add_(target)
    return cov.add_(outer).mul_(2.0), rho
