"""Gradual OBS pruning with distillation fine-tuning between the steps (``prune --recover-steps N``).

Step t = 1..N of the schedule (:mod:`.schedule`, Zhu & Gupta 2017, eq. 1):

1. the method's inverse-Fisher estimate at the current weights: the first fit, then the method's refit
   (FishLeg's Q continues its auxiliary-loss fit warm from where it is, the FLS paper's progressive
   assimilation, McGowan et al. 2024, sec. 4; oBERT / iEF / M-FAC re-estimate their empirical Fisher);
2. one OBS step to s_t: saliencies w^2 / (2 Q_qq), global (or per-layer) selection, and the method's
   compensation (:func:`~fls_compress.pruning.obs.obs_update`), exactly as a one-shot sub-step;
3. distillation fine-tuning with the masks fixed (:class:`.distill.Distiller`): ``iters`` Adam steps
   (``final_iters`` after the last step), early-stopped on held-out inputs.

The dense model's outputs are taken once, before step 1, on the distillation inputs (the calibration
inputs plus ``--recover-data``), and a seeded fraction of those inputs is held out for early stopping;
the verification data of the run is never read here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import Any

import numpy as np

from ..curvature.problem import FisherProblem
from ..errors import InvalidOptionError
from ..progress import stage_progress
from ..pruning.base import PruneStep, SparsitySpec
from ..pruning.obs import OBSPruner, obs_scores, obs_update
from .distill import CHECKS_PER_PHASE, Distiller
from .schedule import sparsity_schedule

log = logging.getLogger(__name__)

BN_NOTE = ("the module stays in eval mode during fine-tuning: BatchNorm running statistics and dropout are "
           "those of the ONNX file; only the prunable weights are trained (biases and norms are unchanged)")


def distillation_pool(problem: FisherProblem, extra: Any, label_weight: float) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """The calibration inputs plus the ``--recover-data`` ones (a CalibrationData or ``None``), and the
    true targets of every pool sample when ``label_weight`` > 0 (else ``None``)."""
    pool = dict(problem.inputs)
    if extra is not None:
        if sorted(extra.inputs) != sorted(pool):
            raise InvalidOptionError(f"--recover-data holds inputs {sorted(extra.inputs)}; the model takes {sorted(pool)}")
        pool = {k: np.concatenate([v, extra.inputs[k].astype(v.dtype, copy=False)]) for k, v in pool.items()}
    if label_weight <= 0:
        return pool, None
    if problem.targets_from_input is not None:
        return pool, pool[problem.targets_from_input]
    if problem.labels is None or (extra is not None and extra.labels is None):
        raise InvalidOptionError("--recover-label-weight needs true targets for every distillation input: class labels "
                                 "in --data (and --recover-data), or a reconstruction model")
    labels = problem.labels if extra is None else np.concatenate([problem.labels, extra.labels])
    return pool, labels


def run_gradual(pruner: OBSPruner, problem: FisherProblem, spec: SparsitySpec, settings: dict[str, Any],
                likelihood: str, extra_data: Any, seed: int, progress_enabled: bool) -> tuple[list[dict], dict[str, Any]]:
    """Gradual pruning as the module docstring says; returns (steps, method info with a ``recovery`` record)."""
    t_start = time.perf_counter()
    estimator = pruner.estimator
    steps_n = int(settings["steps"])
    targets = [spec.sparsity] if spec.nm is not None else sparsity_schedule(spec.sparsity, steps_n, settings["schedule"])
    pool, targets_true = distillation_pool(problem, extra_data, settings["label_weight"])
    distiller = Distiller(problem, likelihood, pool, targets=targets_true, lr=settings["lr"],
                          batch_size=settings["batch_size"], holdout=settings["holdout"],
                          label_weight=settings["label_weight"], seed=seed)
    dense_held = distiller.heldout_loss()
    iters = [settings["iters"]] * (len(targets) - 1) + [settings["final_iters"]]
    units = sum(1 + min(n, CHECKS_PER_PHASE + 1) for n in iters)
    steps: list[dict] = []
    records: list[dict] = []
    info: dict[str, Any] = {}
    with stage_progress(units, f"gradual pruning with {pruner.name}", enabled=progress_enabled) as advance:
        for t, (target, n_iters) in enumerate(zip(targets, iters), start=1):
            stats = estimator.fit(problem) if t == 1 else estimator.refit(problem)
            newly = spec.select(problem, obs_scores(problem, estimator), target)
            obs_update(problem, estimator, newly)
            achieved = problem.sparsity()
            for key, val in stats.extra.items():
                info.setdefault(key, val)
            label = f"{pruner.name} step {t}/{len(targets)} sparsity {achieved:.3f}: "
            advance(f"{label}pruned")
            phase = distiller.finetune(n_iters, advance, label)  # an early stop leaves the bar short (it is transient)
            aux = stats.history[-1] if stats.history else None
            steps.append(asdict(PruneStep(target, achieved, stats.seconds, aux)))
            records.append({"step": t, "target": target, "achieved": achieved, "fit_seconds": stats.seconds,
                            **asdict(phase)})
            log.info("%s gradual step %d/%d: sparsity %.4f, held-out distillation loss %.4g -> %.4g (%d/%d Adam steps%s)",
                     pruner.name, t, len(targets), achieved, phase.heldout_before, phase.heldout_after, phase.iters_run,
                     n_iters, ", stopped early" if phase.stopped_early else "")
    layer_info = getattr(estimator, "layer_info", None) or {}
    updates = sorted({str(i.get("update")) for i in layer_info.values()})
    if updates:
        info.setdefault("obs_update", ",".join(updates))
    info["recovery"] = recovery_record(settings, targets, likelihood, problem.num_samples, extra_data, distiller,
                                       dense_held, records, "prunable weights", t_start)
    return steps, info


def recovery_record(settings: dict[str, Any], schedule: list[float], likelihood: str, calibration: int, extra_data: Any,
                    distiller: Distiller, dense_held: float, records: list[dict], trained: str, t_start: float) -> dict:
    """The report's ``recovery`` section: settings, schedule, the loss, the input split, the per-step records
    (``step``, ``stopped_early``, ... each) and the time since ``t_start``."""
    return {
        "settings": dict(settings), "schedule": schedule, "likelihood": likelihood,
        "loss": f"KL(dense || pruned) in the {likelihood} likelihood" + (
            f", mixed with the true-target NLL at weight {settings['label_weight']}" if settings["label_weight"] > 0 else ""),
        "inputs": {"calibration": calibration, "recover_data": 0 if extra_data is None else extra_data.num_samples,
                   "train": int(len(distiller.train_idx)), "heldout": int(len(distiller.held_idx))},
        "heldout_dense": dense_held, "steps": records,
        "stopped_early": [r["step"] for r in records if r["stopped_early"]],
        "trained": trained, "batchnorm": BN_NOTE, "seconds": time.perf_counter() - t_start,
    }
