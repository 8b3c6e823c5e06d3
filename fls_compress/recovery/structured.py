"""Structured pruning with distillation fine-tuning (``prune --structure ... --recover-steps N``).

Removing whole channels, neurons or heads changes the graph itself, so the fine-tuning runs on the
pruned graph, converted anew:

1. the dense model, converted by onnx2torch, gives the teacher outputs on the distillation inputs (the
   calibration inputs plus ``--recover-data``; a seeded fraction held out for early stopping), in the
   likelihood of the model's task (Hinton et al. 2015; :class:`~fls_compress.recovery.distill.Distiller`);
2. step t = 1..N of the schedule s_1 < ... < s_N (:mod:`.schedule`, Zhu & Gupta 2017, eq. 1): the structured
   prune (:func:`fls_compress.structured.stage.run_structured`: L2 norms, or structured OBS with the
   consumers' compensation, OBC / ZipLM) of the current graph, removing from every group what it takes to
   have removed round(s_t * original size) of it (so the last step keeps exactly what a one-shot prune to
   s_N keeps, in count);
3. the smaller graph, converted, has its Conv / Gemm / MatMul weights trained with Adam on
   KL(dense || pruned) for ``--recover-iters`` steps (``--recover-final-iters`` after the last prune),
   early-stopped on the held-out inputs, and those weights are written back into it; the next step's
   saliencies and Hessians are those of the fine-tuned graph.

As in gradual recovery the module stays in eval mode (BatchNorm statistics as in the file) and only the
layer weights train; there are no masks (every remaining weight is free). The report composes the steps:
each group's removed indices are those of the original graph. Pruning structure first and recovering
accuracy by fine-tuning afterwards is the usual recipe for structured pruning (Li et al. 2017, "Pruning
filters for efficient ConvNets", sec. 3.4); interleaving smaller prunes with fine-tuning is the gradual
recipe of Zhu & Gupta 2017 and ZipLM (Kurtic et al. 2023, sec. 4).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, replace

from ..configs import RunOptions
from ..errors import UnsupportedModelError
from ..io.calibration import CalibrationData, load_calibration
from ..io.onnx_model import write_back
from ..progress import stage_progress
from ..structured.selection import removal_count
from .distill import CHECKS_PER_PHASE, Distiller
from .gradual import distillation_pool, recovery_record
from .schedule import sparsity_schedule

log = logging.getLogger(__name__)


def run_structured_recovery(model, config, calib: CalibrationData, device: str, opts: RunOptions):
    """The structured prune of ``config`` in ``--recover-steps`` steps, the pruned graph distilled after each
    (module docstring); the :class:`~fls_compress.pruning.stage.Outcome` of the composed prune with the
    fine-tuned weights and a ``recovery`` record in its info."""
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
    schedule = sparsity_schedule(config.target, int(settings["steps"]), settings["schedule"])
    iters = [int(settings["iters"])] * (len(schedule) - 1) + [int(settings["final_iters"])]
    outcomes, records, convert_s = [], [], convert_dense
    current, original, excluded, student = model, None, [], None
    removed: dict[str, int] = {}  # per group (producer): how many of its original channels are gone
    warned: set[tuple] = set()  # (producer, node) of the groups left whole, warned about once
    with stage_progress(sum(1 + min(n, CHECKS_PER_PHASE + 1) for n in iters), "structured pruning with distillation",
                        enabled=opts.progress) as advance:
        for t, (target, n_iters) in enumerate(zip(schedule, iters), start=1):
            note = _prune_step(t, target, original, removed, config.channel_multiple)
            if note is None:
                try:
                    outcome = run_structured(current, config, calib, opts, target=target, original=original,
                                             announce=t == 1)
                except UnsupportedModelError as exc:
                    if t == 1:
                        raise
                    note = f"no group could be pruned further ({exc})"
                    log.warning("structured recovery step %d: %s; this step only fine-tunes", t, note)
                else:
                    if original is None:  # the sizes every later step's fraction counts from
                        original = {g["producer"]: g["size"] for g in outcome.info.get("groups", [])}
                        warned = {(k.get("producer"), k.get("node")) for k in outcome.info.get("skipped", [])}
                    for k in outcome.info.get("skipped", []):  # left whole only from this step on
                        if (k.get("producer"), k.get("node")) not in warned:
                            warned.add((k.get("producer"), k.get("node")))
                            log.warning("structured recovery step %d leaves %s (%s) as it is: %s", t, k.get("producer"),
                                        k.get("node"), k.get("reason"))
                    removed.update({g["producer"]: original.get(g["producer"], g["size"]) - g["kept"]
                                    for g in outcome.info.get("groups", [])})
                    student, _, excluded, seconds = build_problem(outcome.model, config, calib, device, opts)
                    convert_s += seconds
                    distiller.retarget(student)
                    outcomes.append((t, outcome))
            achieved = sum(removed.values()) / max(sum((original or {}).values()), 1)
            label = f"structured step {t}/{len(schedule)} {config.structure} {achieved:.3f}: "
            advance(f"{label}pruned" if note is None else f"{label}nothing pruned")
            phase = distiller.finetune(n_iters, advance, label)
            last = outcomes[-1][1]
            last.model = write_back(last.model, {name: w.to_onnx() for name, w in student.weights.items()})  # type: ignore[union-attr]
            current = last.model
            records.append({"step": t, "target": target, "achieved": achieved, "structure": config.structure,
                            "pruned": note is None, **({"note": note} if note else {}), **asdict(phase)})
            log.info("structured recovery step %d/%d: %.3f of the %s removed, held-out distillation loss %.4g -> %.4g "
                     "(%d/%d Adam steps%s; dense %.4g)", t, len(schedule), achieved, config.structure,
                     phase.heldout_before, phase.heldout_after, phase.iters_run, n_iters,
                     ", stopped early" if phase.stopped_early else "", dense_held)
    improved = [r["step"] for r in records if r["best_iter"] > 0]
    if sum(iters) and not improved:
        log.warning("structured recovery: no fine-tuning checkpoint lowered the held-out distillation loss (%.4g): the "
                    "weights stay as the structured prune left them (more distillation inputs, --recover-data, or a "
                    "smaller --recover-lr may help)", records[-1]["heldout_before"])
    outcome = compose(outcomes, len(schedule))
    outcome.likelihood = guess.likelihood
    outcome.convert_s = sum(o.convert_s for _, o in outcomes) + convert_s
    outcome.conversion = student.conversion  # type: ignore[union-attr]
    trained = "the pruned graph's Conv/Gemm/MatMul weights" + (f" (not {', '.join(excluded)})" if excluded else "")
    outcome.info["recovery"] = {
        **recovery_record(settings, schedule, guess.likelihood, calib.num_samples, extra, distiller, dense_held, records,
                          trained, t_start),
        "improved": bool(improved), "improved_steps": improved,
    }
    return outcome


def _prune_step(t: int, target: float, original: dict[str, int] | None, removed: dict[str, int], multiple: int) -> str | None:
    """Why step ``t`` prunes nothing (every group has already lost what the schedule asks of it at ``target``:
    small groups round to the same count at neighbouring steps), or ``None`` when it prunes."""
    if original is None:
        return None
    due = sum(max(0, removal_count(size, target, multiple) - removed.get(k, 0)) for k, size in original.items())
    return None if due else f"every group already meets the {target:.3f} target (kept counts round to the same numbers)"


def compose(outcomes: list, n_steps: int):
    """One :class:`~fls_compress.pruning.stage.Outcome` for the (step, outcome) pairs of a gradual structured
    prune of ``n_steps`` steps: the last prune's model and method info, the first's layers (the original
    shapes), and per group the original size, the count kept at the end, the removed indices in the original
    numbering and the count removed at each step (``removed_per_step``); tensor shapes from the first step's
    "before" to the last step's "after"; the groups skipped at any step (later steps' with their ``step``)."""
    first, last = outcomes[0][1], outcomes[-1][1]
    alive: dict[str, list[int]] = {}
    composed: dict[str, dict] = {}
    per_step: dict[str, list[int]] = {}
    for t, o in outcomes:
        for g in o.info.get("groups", []):
            key = g["producer"]
            idx = alive.setdefault(key, list(range(g["size"])))
            if len(idx) != g["size"]:
                raise RuntimeError(f"structured step {t}: group {key} has {g['size']} channels, {len(idx)} expected")
            gone = set(g["removed"])
            alive[key] = [a for i, a in enumerate(idx) if i not in gone]
            per_step.setdefault(key, [0] * n_steps)[t - 1] = len(gone)
            size = composed[key]["size"] if key in composed else g["size"]
            composed[key] = {**g, "size": size, "kept": len(alive[key]),
                             "removed": sorted(set(range(size)) - set(alive[key])), "removed_per_step": per_step[key]}
    shapes: dict[str, dict] = {}
    for _, o in outcomes:
        for name, change in o.info.get("shapes", {}).items():
            shapes[name] = {"before": shapes.get(name, change)["before"], "after": change["after"]}
    skipped, seen = [], set()
    for t, o in outcomes:
        for s in o.info.get("skipped", []):
            key = (s.get("producer"), s.get("node"))
            if key not in seen:
                seen.add(key)
                skipped.append({**s, **({"step": t} if t > 1 else {})})
    info = {**last.info, "groups": list(composed.values()), "shapes": shapes, "skipped": skipped}
    for name in ("constants_promoted", "splits_made_explicit"):  # what the first step normalised in the graph
        if name in first.info:
            info[name] = first.info[name]
    return replace(last, layers=first.layers, excluded=first.excluded, info=info,
                   steps=[s for _, o in outcomes for s in o.steps])
