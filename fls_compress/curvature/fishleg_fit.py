"""The optimisation loop of the FishLeg fit: Adam on the auxiliary loss with validation checkpoints.

A(lambda; u) = 1/2 u^T Q F_gamma Q u - u^T Q u (Garcia, Sutton, Lim, Nickl, ICLR 2023, eq. 8) is
minimised by one fused Adam over every auxiliary parameter, with a linear learning-rate decay and a
backtracking line search on the step size driven by held-out checkpoints of A. The estimator
(:class:`.fishleg.FishLegEstimator`) provides the Q groups, :meth:`aux_step` and :meth:`_apply_all`;
this mixin owns the loop, the checkpoints and the bookkeeping written into :class:`.base.FitStats`.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch

from ..runtime import fast_matmul, fast_matmul_reason
from .base import FitStats
from .problem import FisherProblem

log = logging.getLogger("fls_compress.curvature.fishleg")

CHECK_EVERY = 25
"""Fewest auxiliary steps between two validation checkpoints of the fit."""
MAX_CHECKS = 4
"""Most validation checkpoints of one fit (longer fits space them out)."""


class FitLoop:
    """Mixin: the auxiliary-loss optimisation of :class:`.fishleg.FishLegEstimator`."""

    def _optimizer(self) -> torch.optim.Optimizer:
        """One fused Adam over every auxiliary parameter; lr scaled by 1/sqrt(dim) for the d x d factors.

        Adam moves every coordinate by ~lr per step, so a d x d factor moves by ~lr sqrt(d) in spectral
        norm; without the scaling, large layers (d ~ 1000) blow Q up within a few steps.
        """
        by_lr: dict[float, list[torch.nn.Parameter]] = {}
        for g in self.groups:
            for p, dim in zip(g.params, g.lr_dims()):
                by_lr.setdefault(self.config.lr / math.sqrt(dim), []).append(p)
        groups = [{"params": ps, "lr": lr} for lr, ps in by_lr.items()]
        try:
            return torch.optim.Adam(groups, fused=True)
        except (RuntimeError, ValueError) as exc:  # fused kernels need a supported device/dtype
            log.warning("fused Adam unavailable (%s); using the foreach implementation", exc)
            return torch.optim.Adam(groups, foreach=True)

    def _optimise(self, problem: FisherProblem, steps: int, stats: FitStats) -> FitStats:
        """Adam on the auxiliary loss with a linear lr decay, checked against held-out probes.

        Every max(``CHECK_EVERY``, steps / ``MAX_CHECKS``) steps, at the end and when ``fit_seconds`` runs out, the
        auxiliary loss is measured on a fixed validation set of probes and samples (the per-step loss is
        far too noisy to judge). An improvement becomes
        the new best lambda; otherwise lambda goes back to the best one, the learning rate is halved and
        Adam's moments are reset (a backtracking line search on the step size, so one default lr serves
        layers and models whose factor scales differ). The fit thus never ends worse than its start; when
        no checkpoint improved on it, Q stays at its start and the fit is reported as reverted.
        """
        self._upper = {}
        if steps == 0:
            return stats
        best_state = self._state()
        before = best = self._checkpoint_loss(problem)
        opt = self._optimizer()
        final = self.config.final_lr_fraction
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 - (1.0 - final) * k / max(steps - 1, 1))
        mmask = self._mmask(problem)
        t0 = time.perf_counter()
        budget = self.config.fit_seconds
        done = halvings = 0
        every = max(CHECK_EVERY, steps // MAX_CHECKS)
        for _ in range(steps):
            with fast_matmul(self.groups[0].params[0].device, self.config.fast_matmul) as backend:
                stats.history.append(self.aux_step(problem, opt, mmask, self._product_dtype(backend)))
            sched.step()
            done += 1
            out_of_time = budget is not None and time.perf_counter() - t0 >= budget and done < steps
            if done % every == 0 or done == steps or out_of_time:
                current = self._checkpoint_loss(problem)
                if current < best:
                    best, best_state = current, self._state()
                else:
                    self._load(best_state)
                    opt.state.clear()
                    sched.base_lrs = [lr / 2 for lr in sched.base_lrs]
                    halvings += 1
            if out_of_time:
                log.info("FishLeg fit: time budget of %.1fs spent after %d of %d steps", budget, done, steps)
                stats.extra["stopped_after_steps"] = float(done)
                break
        elapsed = time.perf_counter() - t0
        stats.extra["aux_steps_per_s"] = done / max(elapsed, 1e-12)
        stats.extra["validation_aux_loss_before"] = before
        stats.extra["validation_aux_loss_after"] = best
        stats.extra["lr_halvings"] = float(halvings)
        stats.extra["fit_matmul"] = backend or "float32"
        if backend is None:
            stats.extra["fit_matmul_reason"] = fast_matmul_reason(self.groups[0].params[0].device, self.config.fast_matmul)
        stats.extra["fit_q_products"] = str(self._product_dtype(backend) or torch.float32).removeprefix("torch.")
        if not best < before:
            log.warning("FishLeg fit did not lower the validation auxiliary loss at any checkpoint (%.6g); keeping the "
                        "starting Q (method_info.reverted)", before)
            stats.extra["reverted"] = 1.0
        stats.steps += done
        stats.samples += done * min(self.config.aux_batch, problem.num_samples)
        stats.seconds += time.perf_counter() - t0
        return stats

    def _state(self) -> list[dict[str, torch.Tensor]]:
        return [{k: v.clone() for k, v in g.q.state_dict().items()} for g in self.groups]

    def _load(self, state: list[dict[str, torch.Tensor]]) -> None:
        for g, st in zip(self.groups, state):
            g.q.load_state_dict(st)

    def _checkpoint_loss(self, problem: FisherProblem) -> float:
        """:meth:`validation_loss` for the fit's checkpoints, always in full float32 arithmetic.

        The checkpoints decide which lambda is kept, so they are not run with the fit's fast arithmetic: the
        rounding of oneDNN's bf16 path through a network's Jacobian products has no bound that is small next
        to a checkpoint's progress (it depends on which kernels the CPU has: 4e-7 on one CPU, 2.5e-4 on
        another, against ~1e-2 of progress), whereas float32 makes the accept/reject decisions the same on
        every CPU. A checkpoint costs a few auxiliary steps and a fit has at most ``MAX_CHECKS`` + 1."""
        return self.validation_loss(problem)

    def validation_loss(self, problem: FisherProblem, probes: int = 4) -> float:
        """A(lambda) = mean_u [1/2 v^T F_gamma v - u^T v] / ||u||^2, v = Q u, on fixed probes and samples."""
        gen = torch.Generator().manual_seed(problem.seed + 7919)
        batch = problem.batch_from_indices(np.arange(min(self.config.aux_batch * 2, problem.num_samples)))
        mmask = self._mmask(problem)
        with torch.no_grad():
            u = {n: torch.randn((probes, *m.shape), generator=gen).to(m.device) * m for n, m in mmask.items()}
            v = self._apply_all(u, mmask)[0]
        weights = problem.weights
        fvs = problem.fisher_vps(batch, [{n: weights[n].from_matrix(v[n][p]) for n in v} for p in range(probes)])
        total = 0.0
        for p, fv in enumerate(fvs):
            norm = sum(float((x[p] ** 2).sum()) for x in u.values())
            total += sum(
                float(0.5 * (v[n][p] * (weights[n].to_matrix(fv[n]) + self.gamma * v[n][p])).sum() - (u[n][p] * v[n][p]).sum())
                for n in v
            ) / norm
        return total / probes
