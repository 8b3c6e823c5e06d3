"""FishLeg inverse Fisher: Q forms, Fisher products and the fit against the exact damped inverse."""

from __future__ import annotations

import torch

from fls_compress.curvature.fishleg import BlockQ, FishLegConfig, FishLegEstimator, KroneckerQ
from fls_compress.curvature.likelihoods import make_likelihood

from .conftest import tiny_mlp_problem


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def test_kronecker_q_matches_explicit_kronecker_product_and_diag():
    torch.manual_seed(0)
    q = KroneckerQ(torch.rand(4, 6) + 0.5)
    with torch.no_grad():
        q.R.copy_(torch.randn(4, 4))
        q.L.copy_(torch.randn(6, 6))
        q.a.copy_(torch.rand(4, 6) + 0.5)
    A = q.A.detach()
    explicit = torch.diag(A.reshape(-1)) @ torch.kron(q.R.t() @ q.R, q.L @ q.L.t()).detach() @ torch.diag(A.reshape(-1))
    u = torch.randn(4, 6)
    assert _rel(q(u).detach().reshape(-1), explicit @ u.reshape(-1)) < 1e-5
    assert _rel(q.diag().detach().reshape(-1), torch.diagonal(explicit)) < 1e-5
    # PSD by construction
    assert float(torch.linalg.eigvalsh((explicit + explicit.t()) / 2).min()) > -1e-4


def test_block_q_matches_explicit_block_diagonal():
    torch.manual_seed(0)
    q = BlockQ(torch.rand(3, 7) + 0.1, block_size=5)  # 21 entries -> 5 blocks, last one padded
    with torch.no_grad():
        q.B.copy_(torch.randn_like(q.B))
    blocks = q.block_matrices().detach()
    dense = torch.block_diag(*blocks)[:21, :21]
    u = torch.randn(3, 7)
    assert _rel(q(u).detach().reshape(-1), dense @ u.reshape(-1)) < 1e-5
    assert _rel(q.diag().detach().reshape(-1), torch.diagonal(dense)) < 1e-6


def test_output_hessian_vector_products_match_autograd():
    torch.manual_seed(0)
    out = torch.randn(3, 5)
    v = torch.randn(3, 5)
    for name in ("categorical", "bernoulli", "gaussian"):
        lik = make_likelihood(name)
        target = lik.sample(out, torch.Generator().manual_seed(0))
        hess = torch.autograd.functional.hessian(lambda o: lik.nll(o, target), out)
        expected = (hess.reshape(15, 15) @ v.reshape(-1)).reshape(3, 5)
        assert _rel(lik.output_hvp(out, v), expected) < 1e-5, name


def test_fisher_vector_product_equals_expected_sampled_label_hessian():
    """GGN product J^T H J v equals the Fisher built from the full Jacobian."""
    problem, net = tiny_mlp_problem("categorical")
    batch = problem.next_batch(32)
    params = problem.params
    vec = {n: torch.randn_like(p) for n, p in zip(problem.names, params)}
    fv = problem.fisher_vp(batch, vec)
    out = problem.output(batch)
    jac_rows = []
    for i in range(out.numel()):
        g = torch.autograd.grad(out.reshape(-1)[i], params, retain_graph=True)
        jac_rows.append(torch.cat([x.reshape(-1) for x in g]))
    J = torch.stack(jac_rows).double()  # (B*C, n)
    p = torch.softmax(out.detach().double(), -1)
    H = torch.block_diag(*[torch.diag(pi) - torch.outer(pi, pi) for pi in p]) / out.shape[0]
    expected = J.t() @ H @ J @ torch.cat([vec[n].reshape(-1) for n in problem.names]).double()
    got = torch.cat([fv[n].reshape(-1) for n in problem.names]).double()
    assert _rel(got, expected) < 1e-4


def _fit_and_compare(form: str, steps: int, init: str = "diag", lr: float = 3e-3):
    problem, _ = tiny_mlp_problem("categorical")
    gamma = 0.05
    exact = problem.dense_fisher()
    est = FishLegEstimator(
        FishLegConfig(form=form, block_size=30, damping=gamma, init=init, fit_steps=steps, aux_batch=256, lr=lr, diag_samples=256)
    )
    stats = est.fit(problem)
    errors, offset = {}, 0
    for name, w in problem.weights.items():
        k = w.numel
        target = torch.linalg.inv(exact[offset : offset + k, offset : offset + k] + gamma * torch.eye(k, dtype=torch.float64))
        offset += k
        errors[name] = _rel(est.dense_block(name).double(), target)
    return errors, stats


def test_fishleg_block_form_converges_to_exact_damped_inverse_fisher():
    before, _ = _fit_and_compare("block", 0)
    after, stats = _fit_and_compare("block", 1500, lr=2e-2)
    for name in after:
        assert after[name] < 0.05, (name, after[name])
        assert after[name] < 0.3 * before[name]
    # the auxiliary loss A(lambda) decreased
    assert sum(stats.history[-50:]) / 50 < sum(stats.history[:50]) / 50


def test_fishleg_kronecker_form_improves_on_its_initialisation():
    before, _ = _fit_and_compare("kron", 0, init="identity")
    after, _ = _fit_and_compare("kron", 600, init="identity", lr=1e-2)
    for name in after:
        assert after[name] < 0.5 * before[name], (name, before[name], after[name])
        assert after[name] < 0.25


def test_fishleg_kfac_initialisation_is_close_before_any_fit():
    errors, _ = _fit_and_compare("kron", 0, init="kfac")
    ident, _ = _fit_and_compare("kron", 0, init="identity")
    for name in errors:
        assert errors[name] < ident[name]


def test_row_exact_obs_update_matches_the_constrained_quadratic_minimiser():
    """w* = argmin (w - theta)^T Q_r^{-1} (w - theta) s.t. w_P = 0, row by row, with Q_r = D_A L L^T D_A."""
    problem, _ = tiny_mlp_problem("categorical", sizes=(8, 6, 4))
    est = FishLegEstimator(FishLegConfig(init="kfac", fit_steps=0, damping=0.05, diag_samples=64, update="row-exact"))
    est.fit(problem)
    name = problem.names[0]
    w = problem.weights[name]
    group = est.group_of[name]
    i = group.index[name]
    with torch.no_grad():
        group.q.a[i].mul_(torch.rand_like(group.q.a[i]) + 0.5)  # a non-trivial diagonal rescaling
    _, L, A = group.member(name)
    theta = w.parameter.detach().clone()
    problem.masks[name][0, 1] = False  # already pruned earlier: must stay at zero
    theta[0, 1] = 0.0
    with torch.no_grad():
        w.parameter.copy_(theta)
    prune = torch.zeros_like(problem.masks[name])
    prune[0, [0, 3]] = True
    prune[2, 5] = True
    delta = est.block_exact_update(name, theta, prune)
    L = L.double()
    for r in range(theta.shape[0]):
        removed = (~problem.masks[name][r]) | prune[r]
        if not bool(prune[r].any()):
            assert bool((delta[r] == 0).all())
            continue
        d = A.double()[r]
        H = torch.linalg.inv(torch.diag(d) @ L @ L.t() @ torch.diag(d))
        kept = ~removed
        t = theta[r].double()
        expected = torch.zeros_like(t)
        expected[kept] = t[kept] + torch.linalg.solve(H[kept][:, kept], H[kept][:, removed] @ t[removed])
        assert torch.allclose((t + delta[r].double()), expected, atol=1e-5), r
