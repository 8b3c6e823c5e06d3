"""The lazy-block OBS column sweep against closed forms and a brute-force column-by-column reference."""

from __future__ import annotations

import pytest
import torch

from fls_compress.pruning.sweep import inverse_hessian_cholesky, obs_sweep


def _spd(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 2 * n, generator=gen, dtype=torch.float64)
    return a @ a.t() / (2 * n) + 0.1 * torch.eye(n, dtype=torch.float64)


def _upper(h: torch.Tensor) -> torch.Tensor:
    """U with U^T U = H^{-1}."""
    return torch.linalg.cholesky(torch.linalg.inv(h), upper=True)


def _reference_row(theta: torch.Tensor, h: torch.Tensor, pruned: torch.Tensor, quantize=None) -> tuple[torch.Tensor, float]:
    """Brute force: for each column i in order, fix w_i to its target and re-solve columns > i exactly.

    Re-solving the free columns F = {i, ..., n-1} given the frozen ones is the constrained least squares
    min (w - theta)^T H (w - theta) s.t. w_{<i} frozen, w_i = q_i; its solution is the single-weight OBS
    step on the sub-problem with inverse Hessian (H_FF)^{-1}.
    """
    w = theta.clone()
    n = w.numel()
    loss = 0.0
    for i in range(n):
        target = 0.0 if bool(pruned[i]) else (float(w[i]) if quantize is None else float(quantize(w[i : i + 1], i)[0]))
        hinv = torch.linalg.inv(h[i:, i:])
        step = (float(w[i]) - target) / float(hinv[0, 0])
        loss += 0.5 * (float(w[i]) - target) ** 2 / float(hinv[0, 0])
        w[i:] -= step * hinv[:, 0]
        w[i] = target
    return w, loss


def _problem(rows=5, cols=9, seed=0):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    H = _spd(cols, seed + 1)
    mask = torch.rand(rows, cols, generator=gen) < 0.4
    return W, H, mask


def test_single_weight_in_first_column_equals_closed_form_obs():
    W, H, _ = _problem()
    Hinv = torch.linalg.inv(H)
    mask = torch.zeros_like(W, dtype=torch.bool)
    mask[:, 0] = True
    res = obs_sweep(W, _upper(H), prune_mask=mask, block_size=4)
    # OBS (Hassibi & Stork 1993): delta = -w_q / [H^-1]_qq H^-1 e_q, loss w_q^2 / (2 [H^-1]_qq)
    expected = W - (W[:, 0] / Hinv[0, 0])[:, None] * Hinv[:, 0][None, :]
    assert torch.allclose(res.weight, expected, atol=1e-10)
    assert torch.allclose(res.loss, W[:, 0] ** 2 / (2 * Hinv[0, 0]), rtol=1e-10)


def test_single_weight_in_a_later_column_equals_obs_on_the_trailing_columns():
    """Columns before q are already processed (frozen); OBS acts on the sub-problem of columns >= q."""
    W, H, _ = _problem()
    q = 5
    mask = torch.zeros_like(W, dtype=torch.bool)
    mask[:, q] = True
    res = obs_sweep(W, _upper(H), prune_mask=mask, block_size=3)
    sub = torch.linalg.inv(H[q:, q:])
    expected = W.clone()
    expected[:, q:] -= (W[:, q] / sub[0, 0])[:, None] * sub[:, 0][None, :]
    assert torch.allclose(res.weight, expected, atol=1e-10)
    assert bool((res.weight[:, q] == 0).all())


@pytest.mark.parametrize("block_size", [1, 3, 4, 128])
def test_random_mask_matches_column_by_column_reference_and_loss_is_exact(block_size):
    W, H, mask = _problem(rows=6, cols=11, seed=3)
    res = obs_sweep(W, _upper(H), prune_mask=mask, block_size=block_size)
    assert bool((res.weight[mask] == 0).all())  # exactly zero
    assert torch.equal(res.pruned, mask)
    for r in range(W.shape[0]):
        ref, ref_loss = _reference_row(W[r], H, mask[r])
        assert torch.allclose(res.weight[r], ref, atol=1e-9), r
        assert float(res.loss[r]) == pytest.approx(ref_loss, rel=1e-9)
        d = res.weight[r] - W[r]
        assert float(res.loss[r]) == pytest.approx(float(0.5 * d @ H @ d), rel=1e-9)


def test_row_scale_equals_unscaled_sweep_with_explicit_per_row_factor():
    W, H, mask = _problem(rows=4, cols=10, seed=5)
    U = _upper(H)
    gen = torch.Generator().manual_seed(9)
    scale = torch.rand(W.shape, generator=gen, dtype=torch.float64) + 0.3
    scale[1, 2] *= -1.0  # a sign flip (D_A may be negative) changes nothing in H_r^{-1} = D U^T U D
    res = obs_sweep(W, U, row_scale=scale, prune_mask=mask, block_size=3)
    for r in range(W.shape[0]):
        Ur = U * scale[r][None, :]
        one = obs_sweep(W[r : r + 1], Ur, prune_mask=mask[r : r + 1], block_size=3)
        assert torch.allclose(res.weight[r], one.weight[0], atol=1e-10)
        assert float(res.loss[r]) == pytest.approx(float(one.loss[0]), rel=1e-10)
        # and against the brute-force reference with H_r = (D_r U^T U D_r)^{-1}
        Hr = torch.linalg.inv(Ur.t() @ Ur)
        ref, ref_loss = _reference_row(W[r], Hr, mask[r])
        assert torch.allclose(res.weight[r], ref, atol=1e-8)
        assert float(res.loss[r]) == pytest.approx(ref_loss, rel=1e-8)


def test_quantize_puts_survivors_on_the_grid_and_pruned_at_zero():
    W, H, mask = _problem(rows=5, cols=8, seed=7)
    step = 0.25

    def quantize(col, index):
        return torch.round(col / step) * step

    res = obs_sweep(W, _upper(H), prune_mask=mask, quantize=quantize, block_size=3)
    assert bool((res.weight[mask] == 0).all())
    kept = res.weight[~mask]
    assert torch.equal(kept, torch.round(kept / step) * step)
    for r in range(W.shape[0]):
        ref, ref_loss = _reference_row(W[r], H, mask[r], quantize=quantize)
        assert torch.allclose(res.weight[r], ref, atol=1e-9)
        assert float(res.loss[r]) == pytest.approx(ref_loss, rel=1e-9)


def test_adaptive_select_sees_compensated_block_and_is_reproducible_by_its_mask():
    W, H, _ = _problem(rows=6, cols=12, seed=11)
    seen = []

    def select(block, d, i1, i2):
        seen.append((i1, i2, d.clone()))
        score = block**2 / d  # SparseGPT saliency
        k = block.shape[1] // 2
        idx = torch.topk(score, k, dim=1, largest=False).indices
        return torch.zeros_like(block, dtype=torch.bool).scatter_(1, idx, True)

    U = _upper(H)
    res = obs_sweep(W, U, select=select, block_size=4)
    assert [(a, b) for a, b, _ in seen] == [(0, 4), (4, 8), (8, 12)]
    assert torch.allclose(seen[1][2], (U.diagonal()[4:8] ** 2).expand(6, 4))
    assert bool((res.pruned.sum(1) == 6).all())
    again = obs_sweep(W, U, prune_mask=res.pruned, block_size=4)
    assert torch.equal(again.weight, res.weight)


def test_inverse_hessian_cholesky_factorises_l_lt():
    gen = torch.Generator().manual_seed(0)
    L = torch.randn(7, 7, generator=gen, dtype=torch.float64)
    U, eps = inverse_hessian_cholesky(L @ L.t())
    assert eps == 0.0
    assert torch.allclose(U.t() @ U, L @ L.t(), atol=1e-10)
    assert torch.equal(U, torch.triu(U))
