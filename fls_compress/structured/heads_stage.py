"""``prune --structure heads``: remove whole attention heads and shrink the ONNX tensors.

Attention blocks (:mod:`~fls_compress.structured.heads`) are processed in graph order. Each loses
``round(sparsity * H)`` of its ``H`` heads (at least one kept), chosen by

* ``-m magnitude``: the L2 norm of each head's weights (its Wq, Wk, Wv columns and biases, and its ``d``
  input rows of Wo); no compensation (the baseline of Michel et al. 2019 ranks heads by importance
  scores instead; the norm is the data-free analogue of the channel baseline);
* ``-m sparsegpt``: structured OBS on Wo (OBC, Frantar & Alistarh 2022; ZipLM, Kurtic et al. 2023): with
  ``H_o = 2 X^T X / n`` the (damped) Hessian of Wo's input rows ``X`` (the concatenated head outputs),
  removing head ``G`` (a block of ``d`` columns) costs ``E_G = 1/2 sum_rows w_G^T ((H_o^-1)_GG)^-1 w_G`` and
  the optimal update of the remaining columns is ``dW = -W_G ((H_o^-1)_GG)^-1 (H_o^-1)_{G,:}``, applied
  greedily head by head (:func:`~fls_compress.structured.selection.obs_select`, blocks of ``d``; Wo's own
  bias, when it has one, absorbs the removed heads' mean output). Q, K and V of a removed head only feed
  that head, so they need no update.

Each block is then rewritten (:mod:`.heads_rewrite`) and checked: the rewritten graph must reproduce, on
the probe batch, the unshrunk graph whose Wo has the removed heads' rows zeroed (the compensated Wo for
structured OBS); a block that does not is left whole with the reason.
"""

from __future__ import annotations

import fnmatch
import logging

import numpy as np
import onnx
import torch

from ..configs import RunOptions
from ..configs.pruning import PruneConfig
from ..errors import UnsupportedModelError
from ..io.activations import ActivationSession, prepare_feeds
from ..io.calibration import CalibrationData
from ..progress import stage_progress
from .groups import consumer_slice
from .heads import HeadGroup, find_head_groups
from .heads_rewrite import apply, plan
from .report import stage_outcome
from .rewrite import read, replace_initializer
from .selection import l2_select, obs_select, step_removal_count
from .shapes import probe
from .types import Reject, Skipped

log = logging.getLogger(__name__)

AGREEMENT_RTOL = 1e-4  # relative L2 difference allowed between the rewritten graph and its zeroed reference


def head_norms(model: onnx.ModelProto, group: HeadGroup) -> torch.Tensor:
    """Squared L2 norm of each head's weights: its projection columns / biases / per-head constants and its
    ``d`` input rows of Wo."""
    total = np.zeros(group.heads)
    for s in group.slices:
        arr = np.moveaxis(read(model, s.name).astype(np.float64), s.axis, 0)
        total += (arr.reshape(s.outer, group.heads, s.inner, -1) ** 2).sum(axis=(0, 2, 3))
    cs = consumer_slice(model, group.consumer)
    wo = np.moveaxis(read(model, cs.name).astype(np.float64), cs.axis, 0)
    total += (wo.reshape(group.heads, cs.block, -1) ** 2).sum(axis=(1, 2))
    return torch.from_numpy(total)


def _outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    names = [o.name for o in model.graph.output]
    size = len(next(iter(feeds.values())))
    got = next(ActivationSession(model, names).iterate(feeds, names, chunk=size))
    return [np.asarray(got[n], dtype=np.float64) for n in names]


def _disagreement(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.linalg.norm(x - y) / max(np.linalg.norm(x), 1e-30)) for x, y in zip(a, b))


def run_heads(model: onnx.ModelProto, config: PruneConfig, calib: CalibrationData, opts: RunOptions, selection: str,
              target: float | None = None, original: dict[str, int] | None = None, announce: bool = True):
    """Prune the attention heads of ``model``; an :class:`~fls_compress.pruning.stage.Outcome` with the new model
    (``target``, ``original`` and ``announce`` as in :func:`~fls_compress.structured.stage.run_structured`)."""
    from ..pruning.stage import bind_constants
    from .stage import _compensated, _systems, capture_hessians

    work = onnx.ModelProto()
    work.CopyFrom(model)
    feeds = prepare_feeds(work, {k: np.asarray(v)[: opts.num_calibration] for k, v in calib.inputs.items()})
    probes = probe(bind_constants(work, calib.constants), feeds)
    check_feeds = {k: v[: probes[-1].size] for k, v in feeds.items()}
    groups, skipped = find_head_groups(work, probes)
    todo: list[HeadGroup] = []
    for g in groups:
        names = list(g.producers) + [g.consumer.weight]
        hit = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in config.exclude)]
        if hit:
            skipped.append(Skipped(g.producers[0], g.node, f"--exclude matches {', '.join(hit)}"))
        else:
            todo.append(g)
    hessians: dict[str, torch.Tensor] = {}
    if selection == "obs" and not config.sequential and todo:
        hessians = capture_hessians(bind_constants(work, calib.constants), [g.consumer for g in todo], feeds,
                                    config.max_rows_per_layer, opts.seed)
    target = config.target if target is None else target
    original = original or {}
    info_groups, shapes = [], {}
    with stage_progress(len(todo), f"head pruning ({selection})", enabled=opts.progress) as advance:
        for g in todo:
            count = step_removal_count(g.heads, target, config.channel_multiple, original.get(g.producers[0]))
            entry = {"producer": g.producers[0], "producers": list(g.producers), "node": g.node, "op_type": "attention",
                     "size": g.heads, "head_dim": g.head_dim, "consumers": [g.consumer.node]}
            if count == 0:
                entry.update(kept=g.heads, removed=[])
                info_groups.append(entry)
                advance(f"{g.node}: {g.heads}/{g.heads}")
                continue
            try:
                patches, changed = plan(work, probes, g, g.heads - count)
            except Reject as exc:
                skipped.append(Skipped(g.producers[0], g.node, str(exc)))
                advance(f"{g.node}: skipped")
                continue
            new_values: dict[str, np.ndarray] = {}
            if selection == "l2":
                keep = l2_select(head_norms(work, g).sqrt()[:, None], count)
            else:
                if config.sequential:
                    hessians = capture_hessians(bind_constants(work, calib.constants), [g.consumer], feeds,
                                                config.max_rows_per_layer, opts.seed)
                systems, layouts = _systems(work, (g.consumer,), hessians, config.percdamp)
                keep, costs = obs_select(systems, g.heads, count)
                entry["obs_costs"] = costs
                entry["bias_compensated"] = [g.consumer.node] if systems[0].has_bias else []
                new_values = _compensated(work, (g.consumer,), systems, layouts)
            keep_np = keep.numpy().astype(np.int64)
            removed = sorted(set(range(g.heads)) - set(keep_np.tolist()))
            reference = _reference(work, g, removed, new_values)
            candidate = onnx.ModelProto()
            candidate.CopyFrom(work)
            changed_shapes = apply(candidate, g, keep_np, patches, changed, new_values)
            try:
                gap = _disagreement(_outputs(bind_constants(reference, calib.constants), check_feeds),
                                    _outputs(bind_constants(candidate, calib.constants), check_feeds))
            except Exception as exc:  # noqa: BLE001 - onnxruntime refusing the rewrite is a reason to skip
                gap, why = float("inf"), f"onnxruntime cannot run the rewritten block ({str(exc).splitlines()[0][:200]})"
            else:
                why = f"the rewritten block differs from the zeroed-heads reference by {gap:.2e} (relative L2)"
            if not gap <= AGREEMENT_RTOL:
                skipped.append(Skipped(g.producers[0], g.node, why))
                advance(f"{g.node}: skipped")
                continue
            work = candidate
            shapes.update({k: (shapes.get(k, v)[0], v[1]) for k, v in changed_shapes.items()})
            entry.update(kept=len(keep_np), removed=removed, reshapes_rewritten=len(patches), check_rel_l2=gap)
            info_groups.append(entry)
            log.info("structured: %s keeps %d of %d heads", g.node, len(keep_np), g.heads)
            advance(f"{g.node}: {len(keep_np)}/{g.heads}")
    for s in skipped:
        log.log(logging.WARNING if announce else logging.INFO, "structured pruning leaves %s (%s) whole: %s",
                s.producer or "attention", s.node, s.reason)
    if not info_groups:
        raise UnsupportedModelError(
            "no heads group of this graph can be removed safely"
            + (" (" + "; ".join(f"{s.node}: {s.reason}" for s in skipped[:3]) + ("; ..." if len(skipped) > 3 else "") + ")"
               if skipped else " (no multi-head attention block found: MatMul(Q, K^T) -> Softmax -> MatMul(P, V))"))
    return stage_outcome(model, work, config, selection=selection, groups=info_groups, skipped=skipped, shapes=shapes,
                         unit="heads", group="attention block", extra={"probe_batches": [p.size for p in probes]},
                         target=target)


def _reference(work: onnx.ModelProto, group: HeadGroup, removed: list[int], new_values: dict[str, np.ndarray]):
    """``work`` with Wo's rows of the removed heads zeroed (or Wo / bias replaced by their compensated values)."""
    ref = onnx.ModelProto()
    ref.CopyFrom(work)
    cs = consumer_slice(ref, group.consumer)
    if new_values:
        for name, value in new_values.items():
            replace_initializer(ref, name, value)
        return ref
    wo = np.array(read(ref, cs.name))
    view = np.moveaxis(wo, cs.axis, 0)
    for h in removed:
        view[h * cs.block:(h + 1) * cs.block] = 0
    replace_initializer(ref, cs.name, wo)
    return ref
