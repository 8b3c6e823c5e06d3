"""Output likelihoods p(y | f(x, theta)) used to define the Fisher information.

The Fisher of a model is F = E_x E_{y ~ p(.|x,theta)} [grad l grad l^T] with l = -log p(y | x, theta).
For the three canonical-link likelihoods below the Fisher equals the generalised Gauss-Newton matrix
F = E_x [J^T H_out J], where J = d f / d theta and H_out = d^2 l / d f^2 does not depend on y
(Martens 2020, "New insights and perspectives on the natural gradient method", section 9).
Every likelihood therefore provides

* ``sample``: labels drawn from the model's own predictive distribution (so unlabelled calibration
  data is enough: FishLeg, Garcia et al. ICLR 2023, section 2),
* ``nll``: per-example negative log-likelihood (summed over the output dimensions), averaged over the
  batch - the loss whose Hessian/gradients define the Fisher,
* ``output_hvp``: H_out v for one batch (already divided by the batch size, matching the mean).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F

from ..errors import InvalidOptionError


class Likelihood(ABC):
    """Canonical-link output likelihood over a network output tensor of shape [B, ...]."""

    name: str = ""

    @abstractmethod
    def sample(self, output: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw y ~ p(y | output) (no gradient)."""

    @abstractmethod
    def nll(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean over the batch of the per-example NLL (summed over all non-batch dimensions)."""

    @abstractmethod
    def output_hvp(self, output: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """H_out v, with H_out the Hessian of ``nll`` with respect to ``output`` (batch mean)."""


class CategoricalLikelihood(Likelihood):
    """Softmax over the last dimension of logits ``[B, ..., C]``; targets are class indices ``[B, ...]``.

    H_out = (diag(p) - p p^T) / B per position.
    """

    name = "categorical"

    def sample(self, output, generator=None):
        probs = torch.softmax(output.detach().double(), dim=-1)
        flat = probs.reshape(-1, probs.shape[-1])
        draws = torch.multinomial(flat, 1, generator=generator).squeeze(-1)
        return draws.reshape(probs.shape[:-1])

    def nll(self, output, target):
        batch = output.shape[0]
        logp = torch.log_softmax(output, dim=-1)
        picked = logp.gather(-1, target.long().unsqueeze(-1)).squeeze(-1)
        return -picked.sum() / batch

    def output_hvp(self, output, v):
        p = torch.softmax(output.detach(), dim=-1)
        pv = (p * v).sum(-1, keepdim=True)
        return (p * v - p * pv) / output.shape[0]


class BernoulliLikelihood(Likelihood):
    """Independent Bernoulli per output element given logits (sigmoid BCE summed over elements).

    H_out = diag(s (1 - s)) / B with s = sigmoid(logits). This is the MNIST-autoencoder likelihood of
    the FishLeg and FLS papers.
    """

    name = "bernoulli"

    def sample(self, output, generator=None):
        probs = torch.sigmoid(output.detach())
        return torch.bernoulli(probs, generator=generator)

    def nll(self, output, target):
        return F.binary_cross_entropy_with_logits(output, target.to(output.dtype), reduction="sum") / output.shape[0]

    def output_hvp(self, output, v):
        s = torch.sigmoid(output.detach())
        return s * (1 - s) * v / output.shape[0]


class GaussianLikelihood(Likelihood):
    """Isotropic Gaussian with fixed variance sigma^2 around the output: H_out = I / (sigma^2 B)."""

    name = "gaussian"

    def __init__(self, sigma: float = 1.0):
        if not sigma > 0:
            raise InvalidOptionError(f"Gaussian likelihood needs sigma > 0, got {sigma}")
        self.sigma = float(sigma)

    def sample(self, output, generator=None):
        noise = torch.randn(output.shape, generator=generator, dtype=output.dtype, device=output.device)
        return output.detach() + self.sigma * noise

    def nll(self, output, target):
        return 0.5 * ((output - target) ** 2).sum() / (self.sigma**2 * output.shape[0])

    def output_hvp(self, output, v):
        return v / (self.sigma**2 * output.shape[0])


LIKELIHOODS = {
    "categorical": CategoricalLikelihood,
    "bernoulli": BernoulliLikelihood,
    "gaussian": GaussianLikelihood,
}


def make_likelihood(name: str) -> Likelihood:
    """Instantiate a likelihood by name (``categorical``, ``bernoulli`` or ``gaussian``)."""
    try:
        return LIKELIHOODS[name]()
    except KeyError:
        raise InvalidOptionError(
            f"unknown likelihood {name!r}; choose one of {', '.join(sorted(LIKELIHOODS))}"
        ) from None
