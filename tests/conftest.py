"""Shared fixtures: tiny torch models wrapped as FisherProblems (exact references are affordable)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fls_compress.curvature.likelihoods import make_likelihood
from fls_compress.curvature.problem import FisherProblem, problem_from_module

# The test models are tiny: one thread is fastest and avoids oversubscription when cores are shared.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _no_log_handler_outlives_a_test():
    """The library installs no logging handlers and the CLI removes its own when a command ends: a handler
    left on ``fls_compress`` would write to a stream a later test has closed ("--- Logging error ---")."""
    import logging

    logger = logging.getLogger("fls_compress")
    before = list(logger.handlers)
    yield
    leftover = [h for h in logger.handlers if h not in before]
    for h in leftover:
        logger.removeHandler(h)
    assert not leftover, f"logging handlers outlived the test: {leftover}"


def tiny_mlp_problem(
    likelihood: str = "categorical", seed: int = 0, n: int = 256, batch_size: int = 64, sizes=(6, 5, 4)
) -> tuple[FisherProblem, nn.Module]:
    """A 6-5-4 tanh MLP on Gaussian inputs, both weight matrices prunable (biases frozen)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    net = nn.Sequential(*layers)
    x = np.random.default_rng(seed).normal(size=(n, sizes[0])).astype(np.float32)
    labels = None
    if likelihood == "categorical":
        with torch.no_grad():
            labels = net(torch.from_numpy(x)).argmax(-1).numpy()
    problem = problem_from_module(net, x, make_likelihood(likelihood), labels=labels, batch_size=batch_size, seed=seed)
    return problem, net


@pytest.fixture
def tiny_problem():
    return tiny_mlp_problem()
