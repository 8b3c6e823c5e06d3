"""``prune --structure channels|neurons``: remove whole channels / neurons and shrink the ONNX tensors
(``heads``: :mod:`.heads_stage`).

Groups (:mod:`~fls_compress.structured.groups`) are processed in graph order. Each loses
``round(sparsity * size)`` of its channels (the same fraction in every group), chosen by

* ``-m magnitude``: the L2 norm of each channel's producer weights (no compensation);
* ``-m sparsegpt``: structured OBS on the layer Hessians ``2 X^T X / n`` of the consumers' inputs
  captured with onnxruntime (:func:`~fls_compress.structured.selection.obs_select`), which also
  compensates the consumers' remaining weights (and bias). With ``sequential`` (default) each group's
  inputs are captured on the model already shrunk upstream, as SparseGPT does layer by layer; otherwise
  all are captured once on the original model.

then the model is rewritten (:mod:`~fls_compress.structured.rewrite`). The result is a whole new graph
(``Outcome.model``) that the engine verifies with onnxruntime like every other output.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import zlib

import numpy as np
import onnx
import torch

from ..configs import RunOptions
from ..configs.pruning import MagnitudeConfig, PruneConfig, SparseGPTConfig
from ..errors import InvalidOptionError, UnsupportedModelError
from ..io.activations import ActivationSession, from_matrix, layer_sites, prepare_feeds, to_matrix, usable_samples
from ..io.calibration import CalibrationData
from ..io.layer_rows import RowStatistics, count_rows, layer_input_rows
from ..progress import stage_progress
from .groups import Consumer, Group, Skipped, consumer_slice, find_groups
from .report import stage_outcome
from .rewrite import explicit_splits, promote_constants, read, shrink
from .selection import ConsumerSystem, damped_inverse, l2_select, obs_select, step_removal_count
from .walk import TRANSPOSED_READER

log = logging.getLogger(__name__)

SELECTION = {MagnitudeConfig: "l2", SparseGPTConfig: "obs"}


def run_structured(model: onnx.ModelProto, config: PruneConfig, calib: CalibrationData, opts: RunOptions,
                   target: float | None = None, original: dict[str, int] | None = None, announce: bool = True):
    """Prune ``model``'s structural groups of ``config.structure``; an :class:`~fls_compress.pruning.stage.Outcome` with the new model.
    ``target`` (default ``config.target``) is the fraction of each group removed; ``original`` maps a group's
    producer to its size before a gradual prune's first step, the fraction then counting from that size;
    ``announce`` False logs the groups left whole at INFO (a gradual prune's later steps: warned at step 1)."""
    from ..pruning.stage import bind_constants

    selection = SELECTION.get(type(config))
    if selection is None:  # the config classes without a ``structure`` knob never get here
        raise InvalidOptionError(f"--structure is not implemented for -m {config.method}")
    if config.structure == "heads":
        from .heads_stage import run_heads

        return run_heads(model, config, calib, opts, selection, target, original, announce)
    work = onnx.ModelProto()
    work.CopyFrom(model)
    promoted = promote_constants(work)
    if promoted:
        log.info("structured: %d float Constant-node tensors (weights, biases, BatchNorm vectors) moved to "
                 "initializers of the same name", len(promoted))
    splits = explicit_splits(work)
    if splits:
        log.info("structured: %d Split node(s) given constant sizes of their own (num_outputs, or sizes shared with "
                 "other nodes)", len(splits))
    analysis = find_groups(work, config.structure)
    skipped = list(analysis.skipped)
    groups: list[Group] = []
    for g in analysis.groups:
        names = [g.producer] + [c.weight for c in g.consumers]
        hit = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in config.exclude)]
        deep = [c.node for c in g.consumers if selection == "obs" and c.op_type == "Conv"
                and len(read(work, c.weight).shape) > 4]
        transposed = [s.name for s in g.slices if s.role == TRANSPOSED_READER]
        if hit:
            skipped.append(Skipped(g.key, g.node, f"--exclude matches {', '.join(hit)}"))
        elif transposed and selection == "obs":
            skipped.append(Skipped(g.key, g.node, f"ConvTranspose weight {transposed[0]} reads the channels (structured "
                                   "OBS has no Hessian of a transposed convolution; -m magnitude can prune it)"))
        elif deep:
            skipped.append(Skipped(g.key, g.node, f"consumer {deep[0]} is a 3-D convolution (structured OBS "
                                   "captures 1-D/2-D convolution inputs only; -m magnitude can prune it)"))
        else:
            groups.append(g)
    for s in skipped:
        log.log(logging.WARNING if announce else logging.INFO, "structured pruning leaves %s (%s) whole: %s", s.producer,
                s.node, s.reason)
    if not groups:
        raise UnsupportedModelError(
            f"no {config.structure} group of this graph can be removed safely"
            + (" (" + "; ".join(f"{s.producer}: {s.reason}" for s in skipped[:3]) + ("; ..." if len(skipped) > 3 else "") + ")"
               if skipped else " (no Conv/Gemm/MatMul producers)"))
    target = config.target if target is None else target
    original = original or {}
    feeds = {k: np.asarray(v)[: opts.num_calibration] for k, v in calib.inputs.items()}
    hessians: dict[str, torch.Tensor] = {}
    if selection == "obs" and not config.sequential:
        hessians = capture_hessians(bind_constants(work, calib.constants), [c for g in groups for c in g.consumers],
                                    feeds, config.max_rows_per_layer, opts.seed)
    info_groups = []
    shapes: dict[str, tuple[list[int], list[int]]] = {}
    touched: set[str] = set()  # consumer weights an earlier group already rewrote
    pending = list(groups)
    with stage_progress(len(groups), f"structured pruning ({selection})", enabled=opts.progress) as advance:
        while pending:
            g = pending.pop(0)
            count = step_removal_count(g.size, target, config.channel_multiple, original.get(g.key))
            entry: dict = {"producer": g.key, "node": g.node, "op_type": g.op_type, "size": g.size,
                           "coupled": list(g.coupled), "consumers": [c.node for c in g.consumers]}
            if g.part is not None:  # one part of a channel Split of the producer's output
                entry.update(weight=g.producer, part=list(g.part))
            new_values: dict[str, np.ndarray] = {}
            if count == 0:  # nothing to remove at this size / multiple: the group stays as it is
                entry.update(kept=g.size, removed=[])
                info_groups.append(entry)
                advance(f"{g.key}: {g.size}/{g.size}")
                continue
            if selection == "l2":
                rows = torch.from_numpy(np.concatenate(  # every producer's filters (coupled ones included; a part's own)
                    [np.moveaxis(read(work, p.name), p.axis, 0)[p.offset:p.offset + g.size].reshape(g.size, -1)
                     for p in g.slices if p.role == "producer weight"], axis=1))
                keep = l2_select(rows, count)
            else:
                if config.sequential:
                    hessians = capture_hessians(bind_constants(work, calib.constants), list(g.consumers), feeds,
                                                config.max_rows_per_layer, opts.seed)
                elif touched.intersection(c.weight for c in g.consumers):  # shares a consumer behind a Concat
                    hessians.update(capture_hessians(bind_constants(work, calib.constants), list(g.consumers), feeds,
                                                     config.max_rows_per_layer, opts.seed))
                systems, layouts = _systems(work, g.consumers, hessians, config.percdamp)
                keep, costs = obs_select(systems, g.size, count)
                entry["obs_costs"] = costs
                entry["bias_compensated"] = [c.node for c, s in zip(g.consumers, systems) if s.has_bias]
                new_values = _compensated(work, g.consumers, systems, layouts)
            keep_np = keep.numpy().astype(np.int64)
            shapes.update({k: (shapes.get(k, v)[0], v[1]) for k, v in
                           shrink(work, g, keep_np, [consumer_slice(work, c) for c in g.consumers], new_values).items()})
            entry.update(kept=int(len(keep_np)), removed=sorted(set(range(g.size)) - set(keep_np.tolist())))
            touched.update(c.weight for c in g.consumers)
            if pending and any(t[3] for t in g.tensors):  # joined by a Concat: the others' offsets and counts moved
                pending, lost = _refresh(work, config.structure, pending)
                skipped += lost
            info_groups.append(entry)
            log.info("structured: %s keeps %d of %d %s", g.key, len(keep_np), g.size, config.structure)
            advance(f"{g.key}: {len(keep_np)}/{g.size}")
    return stage_outcome(model, work, config, selection=selection, groups=info_groups, skipped=skipped, shapes=shapes,
                         unit="channels", group="group", target=target,
                         extra={"constants_promoted": len(promoted), "splits_made_explicit": len(splits)})


def _refresh(model: onnx.ModelProto, kind: str, pending: list[Group]) -> tuple[list[Group], list[Skipped]]:
    """``pending`` re-analysed on the shrunk ``model`` (a group that shares a Concat with one already pruned
    sees new channel offsets and counts there)."""
    fresh = {g.key: g for g in find_groups(model, kind).groups}
    lost = [Skipped(g.key, g.node, "no longer removable once an earlier group shrank") for g in pending
            if g.key not in fresh]
    return [fresh[g.key] for g in pending if g.key in fresh], lost


def capture_hessians(model: onnx.ModelProto, consumers: list[Consumer], feeds: dict[str, np.ndarray],
                     max_rows: int | None, seed: int, chunk: int = 64) -> dict[str, torch.Tensor]:
    """``H = 2 X^T X / n`` of each consumer's input rows (one onnxruntime pass for all of them), with a
    constant-1 column appended for consumers that have their own bias (see :mod:`.selection`)."""
    names = [c.weight for c in consumers]
    sites, uses = layer_sites(model, names)
    values = [uses[n][0].activation for n in names]
    session = ActivationSession(model, values)
    feeds = prepare_feeds(model, feeds)
    n_samples = int(next(iter(feeds.values())).shape[0])
    stats: dict[str, RowStatistics] = {}
    first = True
    for acts in session.iterate(feeds, values, chunk=chunk):
        for c in consumers:
            site, use = sites[c.weight], uses[c.weight][0]
            if first:
                cols = to_matrix(site, use, np.empty(site.shape, dtype=np.float32)).shape[1] + (c.bias is not None)
                layer_seed = (int(seed) * 1_000_003 + zlib.crc32(c.weight.encode())) % 2**32
                stats[c.weight] = RowStatistics(1, cols, full=True, max_rows=max_rows, seed=layer_seed)
                chunk_n = int(np.asarray(acts[use.activation]).shape[0])
                per_chunk = count_rows(site, use, tuple(acts[use.activation].shape))
                stats[c.weight].plan(int(math.ceil(per_chunk * usable_samples(model, n_samples, chunk)[1] / max(chunk_n, 1))))
            for x in layer_input_rows(site, use, acts[use.activation]):
                x = x.double()
                if c.bias is not None:
                    x = torch.cat([x, torch.ones(*x.shape[:2], 1, dtype=x.dtype)], dim=2)
                stats[c.weight].add(x)
        first = False
    return {n: s.hessian(0) for n, s in stats.items()}


def _systems(model: onnx.ModelProto, consumers: tuple[Consumer, ...], hessians: dict[str, torch.Tensor],
             percdamp: float):
    sites, uses = layer_sites(model, [c.weight for c in consumers])
    systems, layouts = [], []
    for c in consumers:
        site, use = sites[c.weight], uses[c.weight][0]
        w = torch.from_numpy(np.array(to_matrix(site, use, read(model, c.weight)), dtype=np.float64))
        if c.bias is not None:
            w = torch.cat([w, torch.from_numpy(read(model, c.bias).astype(np.float64).reshape(-1, 1))], dim=1)
        h = hessians[c.weight]
        if h.shape[0] != w.shape[1]:
            raise UnsupportedModelError(f"captured inputs of {c.node} have {h.shape[0]} columns, its weight {w.shape[1]}")
        systems.append(ConsumerSystem(w, damped_inverse(h, percdamp), c.block, c.bias is not None, c.offset * c.block))
        layouts.append((site, use))
    return systems, layouts


def _compensated(model: onnx.ModelProto, consumers, systems: list[ConsumerSystem], layouts) -> dict[str, np.ndarray]:
    """The consumers' compensated weights (ONNX layout, full size) and biases, in their own dtypes."""
    out: dict[str, np.ndarray] = {}
    for c, s, (site, use) in zip(consumers, systems, layouts):
        full = s.full()
        w = full[:, :-1] if s.has_bias else full
        out[c.weight] = from_matrix(site, use, w.numpy()).astype(read(model, c.weight).dtype)
        if s.has_bias:
            old = read(model, c.bias)
            out[c.bias] = full[:, -1].numpy().reshape(old.shape).astype(old.dtype)
    return out
