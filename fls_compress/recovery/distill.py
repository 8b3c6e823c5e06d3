"""Distillation fine-tuning of a pruned torch module from the dense model's outputs, masks held fixed.

The loss is the KL divergence from the dense model's predictive distribution to the pruned model's, in
the same likelihood that defines the Fisher (Hinton et al. 2015 for the categorical case at temperature
1; the Bernoulli and Gaussian cases are the same construction in their likelihood):

* categorical (logits over the last axis): KL(p_t || p_s) = sum_c p_t,c (log p_t,c - log p_s,c);
* Bernoulli (independent logits): sum_i [q_i (log q_i - log r_i) + (1 - q_i)(log(1 - q_i) - log(1 - r_i))],
  q = sigmoid(teacher), r = sigmoid(student);
* Gaussian with fixed sigma: 1/2 ||f_s - f_t||^2 / sigma^2 (the MSE);

summed over the non-batch axes and averaged over the batch, the scale of the likelihood's NLL. No labels
are needed; with ``label_weight`` a > 0 the objective is (1 - a) KL + a NLL(true targets).

Only the prunable weights are trained (biases, norms and every other tensor stay as in the ONNX file);
the module stays in eval mode, so BatchNorm running statistics and dropout are unchanged. After every
Adam step the masked gradients are zero (they are zeroed before the step) and the masks are re-applied,
so pruned weights stay exactly zero. Each phase keeps the weights of its best held-out checkpoint and
stops after :data:`PATIENCE` checkpoints without improvement (early stopping, Prechelt 1998).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..curvature.problem import Batch, FisherProblem

log = logging.getLogger(__name__)

PATIENCE = 3
"""Held-out checkpoints without improvement before a fine-tuning phase stops."""
CHECKS_PER_PHASE = 8
"""A phase of n Adam steps checks the held-out loss every max(1, n // CHECKS_PER_PHASE) steps."""
TEACHER_BATCH = 256


def kl_divergence(likelihood: str, student: torch.Tensor, teacher: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Batch mean of KL(p(. | teacher) || p(. | student)) summed over the non-batch axes (module docstring)."""
    batch = student.shape[0]
    if likelihood == "categorical":
        logp_t = torch.log_softmax(teacher, dim=-1)
        return (logp_t.exp() * (logp_t - torch.log_softmax(student, dim=-1))).sum() / batch
    if likelihood == "bernoulli":
        q = torch.sigmoid(teacher)
        # cross-entropy H(q, r) minus the entropy H(q), both from logits (stable)
        cross = F.binary_cross_entropy_with_logits(student, q, reduction="sum")
        entropy = F.binary_cross_entropy_with_logits(teacher, q, reduction="sum")
        return (cross - entropy) / batch
    if likelihood == "gaussian":
        return 0.5 * ((student - teacher) ** 2).sum() / (sigma ** 2 * batch)
    raise ValueError(f"no distillation loss for likelihood {likelihood!r}")


@dataclass
class Phase:
    """One fine-tuning phase: its held-out curve and what early stopping did."""

    iters_planned: int
    iters_run: int = 0
    best_iter: int = 0
    heldout_before: float = float("nan")
    heldout_after: float = float("nan")
    stopped_early: bool = False
    seconds: float = 0.0
    curve: list[dict[str, float]] = field(default_factory=list)  # {"iter", "train", "heldout"}


class Distiller:
    """Fine-tunes ``problem``'s prunable weights towards the dense model's outputs on a fixed input pool.

    ``pool``: numpy inputs (sample axis 0) keyed like the problem's inputs; ``targets``: the true targets
    per pool sample (labels or reconstruction targets) when ``label_weight`` > 0, else ``None``. The
    teacher outputs are computed here, once, from the module as it is now (call before pruning).
    """

    def __init__(self, problem: FisherProblem, likelihood: str, pool: dict[str, np.ndarray], *,
                 targets: np.ndarray | None, lr: float, batch_size: int, holdout: float, label_weight: float, seed: int):
        self.problem, self.likelihood, self.lr = problem, likelihood, lr
        self.label_weight = label_weight
        self.device = problem.params[0].device
        n = int(next(iter(pool.values())).shape[0])
        rng = np.random.default_rng(seed + 104729)
        order = rng.permutation(n)
        n_held = max(1, int(round(holdout * n)))
        if n - n_held < 1:
            raise ValueError(f"{n} distillation input(s) leave none to train on after the held-out split")
        self.held_idx, self.train_idx = np.sort(order[:n_held]), order[n_held:]
        self.pool, self.targets = pool, targets
        self.batch_size = min(batch_size, len(self.train_idx))
        self._rng = rng
        self._order = np.empty(0, dtype=np.int64)
        self._cursor = 0
        self.teacher = self._teacher_outputs(n)

    def retarget(self, problem: FisherProblem) -> None:
        """Fine-tune ``problem``'s weights from now on, towards the teacher outputs taken at construction
        (structured pruning: the dense graph was the teacher, the new smaller graph is the student); the
        input pool and its held-out split stay."""
        self.problem, self.device = problem, problem.params[0].device

    # ------------------------------------------------------------------ data
    def _inputs(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.ascontiguousarray(v[idx])).to(self.device) for k, v in self.pool.items()}

    def _teacher_outputs(self, n: int) -> torch.Tensor:
        with torch.no_grad():
            parts = [self.problem.output(Batch(self._inputs(np.arange(i, min(i + TEACHER_BATCH, n))))).float()
                     for i in range(0, n, TEACHER_BATCH)]
        return torch.cat(parts, 0)  # on the problem's device

    def _next_indices(self) -> np.ndarray:
        if self._cursor + self.batch_size > len(self._order):
            self._order = self.train_idx[self._rng.permutation(len(self.train_idx))]
            self._cursor = 0
        idx = self._order[self._cursor:self._cursor + self.batch_size]
        self._cursor += self.batch_size
        return idx

    # ------------------------------------------------------------------ loss
    def objective(self, idx: np.ndarray) -> torch.Tensor:
        """(1 - a) KL(dense || pruned) + a NLL(true targets) on the pool samples ``idx``."""
        out = self.problem.output(Batch(self._inputs(idx)))
        loss = kl_divergence(self.likelihood, out, self.teacher[torch.from_numpy(idx).to(self.device)])
        if self.label_weight > 0:
            target = torch.from_numpy(np.ascontiguousarray(self.targets[idx])).to(self.device)  # type: ignore[index]
            nll = self.problem.likelihood.nll(out, target)
            loss = (1.0 - self.label_weight) * loss + self.label_weight * nll
        return loss

    def heldout_loss(self) -> float:
        """The objective on the held-out inputs (sample-weighted mean over fixed batches)."""
        total, count = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(self.held_idx), TEACHER_BATCH):
                idx = self.held_idx[i:i + TEACHER_BATCH]
                total += float(self.objective(idx)) * len(idx)
                count += len(idx)
        return total / count

    # ------------------------------------------------------------------ fine-tuning
    def finetune(self, iters: int, progress: Callable[[str], None] | None = None, label: str = "") -> Phase:
        """Up to ``iters`` Adam steps with masks fixed; keeps the best held-out checkpoint (early stopping)."""
        problem = self.problem
        phase = Phase(iters)
        t0 = time.perf_counter()
        best = phase.heldout_before = self.heldout_loss()
        phase.curve.append({"iter": 0, "train": float("nan"), "heldout": best})
        if iters == 0:
            phase.heldout_after = best
            return phase
        params = problem.params
        masks = [problem.masks[n] for n in problem.names]
        best_state = [p.detach().clone() for p in params]
        opt = torch.optim.Adam(params, lr=self.lr)
        every = max(1, iters // CHECKS_PER_PHASE)
        stale, running, seen = 0, 0.0, 0
        for it in range(1, iters + 1):
            opt.zero_grad(set_to_none=False)
            loss = self.objective(self._next_indices())
            loss.backward()
            with torch.no_grad():
                for p, m in zip(params, masks):
                    if p.grad is not None:
                        p.grad.mul_(m)
            opt.step()
            problem.apply_masks()
            running += float(loss.detach())
            seen += 1
            phase.iters_run = it
            if it % every == 0 or it == iters:
                held = self.heldout_loss()
                phase.curve.append({"iter": it, "train": running / seen, "heldout": held})
                running, seen = 0.0, 0
                if progress is not None:
                    progress(f"{label}distill loss train {phase.curve[-1]['train']:.4g} held-out {held:.4g}")
                if held < best:
                    best, phase.best_iter, stale = held, it, 0
                    best_state = [p.detach().clone() for p in params]
                else:
                    stale += 1
                    if stale >= PATIENCE:
                        phase.stopped_early = it < iters
                        break
        with torch.no_grad():
            for p, saved in zip(params, best_state):
                p.copy_(saved)
        problem.apply_masks()
        opt.zero_grad(set_to_none=True)
        phase.heldout_after = best
        phase.seconds = time.perf_counter() - t0
        return phase
