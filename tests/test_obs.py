"""OBS scores, selection and the compensating update against their closed forms."""

from __future__ import annotations

import pytest
import torch

from fls_compress.curvature.base import FitStats, InverseFisherEstimator
from fls_compress.errors import InvalidOptionError
from fls_compress.pruning.base import SparsitySpec
from fls_compress.pruning.obs import OBSPruner, obs_scores, obs_update
from fls_compress.pruning.selection import select_global, select_n_of_m

from .conftest import tiny_mlp_problem


class DenseQ(InverseFisherEstimator):
    """An explicit per-layer SPD matrix standing in for Q (a test double of our own interface)."""

    name = "dense"

    def __init__(self, problem, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.problem = problem
        self.q = {}
        for n, w in problem.weights.items():
            a = torch.randn(w.numel, w.numel, generator=gen, dtype=torch.float64)
            self.q[n] = a @ a.t() / w.numel + 0.5 * torch.eye(w.numel, dtype=torch.float64)

    def fit(self, problem):
        return FitStats()

    def diag(self, name):
        return torch.diagonal(self.q[name]).float().reshape(self.problem.weights[name].parameter.shape)

    def matvec(self, name, z):
        p = self.problem.weights[name].parameter
        return (self.q[name] @ z.double().reshape(-1)).float().reshape(p.shape) * self.problem.masks[name]


def test_single_weight_obs_update_matches_closed_form():
    problem, _ = tiny_mlp_problem()
    est = DenseQ(problem)
    name = problem.names[0]
    theta = problem.weights[name].parameter.detach().clone().reshape(-1).double()
    q = 7
    Q = est.q[name]
    expected = theta - theta[q] / Q[q, q] * Q[:, q]
    expected[q] = 0.0
    newly = {n: torch.zeros_like(problem.masks[n]) for n in problem.names}
    newly[name].view(-1)[q] = True
    obs_update(problem, est, newly)
    got = problem.weights[name].parameter.detach().reshape(-1).double()
    assert torch.allclose(got, expected, atol=1e-5)
    assert not bool(problem.masks[name].view(-1)[q])
    # the OBS saliency rho_q = w_q^2 / (2 Q_qq)
    problem2, _ = tiny_mlp_problem()
    scores = obs_scores(problem2, DenseQ(problem2))
    w = problem2.weights[name].parameter.detach().reshape(-1).double()
    assert float(scores[name].reshape(-1)[q]) == pytest.approx(float(w[q] ** 2 / (2 * Q[q, q])), rel=1e-5)


def test_decoupled_group_update_is_minus_q_z_then_hard_zero():
    problem, _ = tiny_mlp_problem()
    est = DenseQ(problem, seed=1)
    name = problem.names[1]
    theta = problem.weights[name].parameter.detach().clone().reshape(-1).double()
    P = torch.tensor([0, 3, 5, 11])
    Q = est.q[name]
    z = torch.zeros_like(theta)
    z[P] = theta[P] / torch.diagonal(Q)[P]
    expected = theta - Q @ z
    expected[P] = 0.0
    newly = {n: torch.zeros_like(problem.masks[n]) for n in problem.names}
    newly[name].view(-1)[P] = True
    obs_update(problem, est, newly)
    assert torch.allclose(problem.weights[name].parameter.detach().reshape(-1).double(), expected, atol=1e-5)


def test_obs_pruner_reaches_target_and_keeps_pruned_weights_zero():
    problem, _ = tiny_mlp_problem()
    spec = SparsitySpec(0.8, steps=3)
    assert spec.schedule()[-1] == pytest.approx(0.8)
    assert all(a < b for a, b in zip(spec.schedule(), spec.schedule()[1:]))
    OBSPruner(DenseQ(problem)).prune(problem, spec)
    total = sum(m.numel() for m in problem.masks.values())
    zeros = sum(int((w.parameter == 0).sum()) for w in problem.weights.values())
    assert zeros >= 0.8 * total and zeros - 0.8 * total < 1
    for n, w in problem.weights.items():
        assert bool((w.parameter.detach()[~problem.masks[n]] == 0).all())


def test_global_selection_counts_and_never_revives():
    scores = {"a": torch.tensor([[0.1, 5.0], [3.0, 0.2]]), "b": torch.tensor([0.3, 4.0, 0.05, 2.0])}
    masks = {"a": torch.ones(2, 2, dtype=torch.bool), "b": torch.tensor([True, True, False, True])}
    masked = {n: torch.where(masks[n], s, torch.full_like(s, float("inf"))) for n, s in scores.items()}
    newly = select_global(masked, masks, 0.5)  # 8 weights, 1 pruned already -> 3 more
    assert sum(int(v.sum()) for v in newly.values()) == 3
    assert newly["a"].tolist() == [[True, False], [False, True]] and newly["b"].tolist() == [True, False, False, False]


def test_n_of_m_selection_pattern():
    problem, _ = tiny_mlp_problem(sizes=(8, 4, 4))
    scores = {n: w.parameter.detach().abs() for n, w in problem.weights.items()}
    newly = select_n_of_m(scores, problem.masks, problem.weights, 2, 4)
    for n, sel in newly.items():
        groups = sel.reshape(sel.shape[0], -1, 4)
        assert bool((groups.sum(-1) == 2).all())
        # the two lowest |w| of each group are chosen
        s = scores[n].reshape(sel.shape[0], -1, 4)
        chosen_max = torch.where(groups, s, torch.full_like(s, -1)).amax(-1)
        kept_min = torch.where(~groups, s, torch.full_like(s, float("inf"))).amin(-1)
        assert bool((chosen_max <= kept_min).all())


@pytest.mark.parametrize("value", [1.0, -0.01, float("nan"), 2.0])
def test_sparsity_out_of_range_is_rejected(value):
    with pytest.raises(InvalidOptionError):
        SparsitySpec(value)
