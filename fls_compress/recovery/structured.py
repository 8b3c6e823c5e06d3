"""Structured pruning with distillation fine-tuning (``prune --structure ... --recover-steps 1``).

Removing whole channels, neurons or heads changes the graph itself, so the fine-tuning runs on the
pruned graph, converted anew:

1. the dense model, converted by onnx2torch, gives the teacher outputs on the distillation inputs (the
   calibration inputs plus ``--recover-data``; a seeded fraction held out for early stopping), in the
   likelihood of the model's task (Hinton et al. 2015; :class:`~fls_compress.recovery.distill.Distiller`);
2. the one-shot structured prune (:func:`fls_compress.structured.stage.run_structured`: L2 norms, or
   structured OBS with the consumers' compensation, OBC / ZipLM);
3. the smaller graph, converted, has its Conv / Gemm / MatMul weights trained with Adam on
   KL(dense || pruned) for ``--recover-final-iters`` steps (early-stopped on the held-out inputs), and
   those weights are written back into it.

As in gradual recovery the module stays in eval mode (BatchNorm statistics as in the file) and only the
layer weights train; there are no masks (every remaining weight is free). Pruning structure first and
recovering accuracy by fine-tuning afterwards is the usual recipe for structured pruning (Li et al. 2017,
"Pruning filters for efficient ConvNets", sec. 3.4; ZipLM, Kurtic et al. 2023, sec. 4).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

from ..configs import RunOptions
from ..io.calibration import CalibrationData, load_calibration
from ..io.onnx_model import write_back
from ..progress import stage_progress
from .distill import CHECKS_PER_PHASE, Distiller
from .gradual import BN_NOTE, distillation_pool

log = logging.getLogger(__name__)


def run_structured_recovery(model, config, calib: CalibrationData, device: str, opts: RunOptions):
    """The structured prune of ``config`` followed by distillation of the pruned graph (module docstring);
    the :class:`~fls_compress.pruning.stage.Outcome` of the prune with the fine-tuned weights and a
    ``recovery`` record in its info."""
    from ..pruning.stage import build_problem
    from ..structured.stage import run_structured

    settings = config.recovery_settings
    t_start = time.perf_counter()
    dense, guess, _, convert_dense = build_problem(model, config, calib, device, opts)
    extra = None
    if settings["data"] is not None:
        extra = load_calibration(settings["data"], model, seed=opts.seed, shapes=opts.shapes, consts=opts.consts)
    pool, targets = distillation_pool(dense, extra, settings["label_weight"])
    distiller = Distiller(dense, guess.likelihood, pool, targets=targets, lr=settings["lr"],
                          batch_size=settings["batch_size"], holdout=settings["holdout"],
                          label_weight=settings["label_weight"], seed=opts.seed)
    dense_held = distiller.heldout_loss()
    del dense
    outcome = run_structured(model, config, calib, opts)
    student, _, excluded, convert_pruned = build_problem(outcome.model, config, calib, device, opts)
    distiller.retarget(student)
    iters = int(settings["final_iters"])
    with stage_progress(1 + min(iters, CHECKS_PER_PHASE + 1), "distillation of the structured-pruned graph",
                        enabled=opts.progress) as advance:
        advance(f"structured {config.structure} pruned")
        phase = distiller.finetune(iters, advance, "structured: ")
    outcome.model = write_back(outcome.model, {name: w.to_onnx() for name, w in student.weights.items()})
    log.info("structured recovery: held-out distillation loss %.4g after pruning -> %.4g (%d/%d Adam steps%s; dense %.4g)",
             phase.heldout_before, phase.heldout_after, phase.iters_run, iters,
             ", stopped early" if phase.stopped_early else "", dense_held)
    improved = phase.best_iter > 0
    if iters and not improved:
        log.warning("structured recovery: no fine-tuning checkpoint lowered the held-out distillation loss (%.4g): the "
                    "weights stay as the one-shot prune left them (more distillation inputs, --recover-data, or a "
                    "smaller --recover-lr may help)", phase.heldout_before)
    groups = outcome.info.get("groups", [])
    achieved = sum(g["size"] - g["kept"] for g in groups) / max(sum(g["size"] for g in groups), 1)
    outcome.likelihood = guess.likelihood
    outcome.convert_s += convert_dense + convert_pruned
    outcome.conversion = student.conversion  # type: ignore[attr-defined]
    outcome.info["recovery"] = {
        "settings": dict(settings), "schedule": [config.target], "likelihood": guess.likelihood,
        "loss": f"KL(dense || pruned) in the {guess.likelihood} likelihood" + (
            f", mixed with the true-target NLL at weight {settings['label_weight']}" if settings["label_weight"] > 0 else ""),
        "inputs": {"calibration": calib.num_samples, "recover_data": 0 if extra is None else extra.num_samples,
                   "train": int(len(distiller.train_idx)), "heldout": int(len(distiller.held_idx))},
        "heldout_dense": dense_held,
        "steps": [{"step": 1, "target": config.target, "achieved": achieved, "structure": config.structure, **asdict(phase)}],
        "stopped_early": [1] if phase.stopped_early else [], "improved": improved,
        "trained": "the pruned graph's Conv/Gemm/MatMul weights" + (f" (not {', '.join(excluded)})" if excluded else ""),
        "batchnorm": BN_NOTE, "seconds": time.perf_counter() - t_start,
    }
    return outcome
