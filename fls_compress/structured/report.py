"""The report sections of a structured prune: what shrank, parameters, size and onnxruntime latency."""

from __future__ import annotations

import math
from typing import Any

import onnx


def parameter_count(model: onnx.ModelProto) -> int:
    """Elements of every initializer (dense and sparse) and ``Constant``-node tensor of the top-level graph
    (paddle2onnx stores weights as Constant nodes; a structured prune moves them to initializers)."""
    dense = sum(int(math.prod(t.dims)) for t in model.graph.initializer)
    constant = sum(int(math.prod(a.t.dims)) for n in model.graph.node if n.op_type == "Constant"
                   for a in n.attribute if a.name == "value")
    return dense + constant + sum(int(math.prod(s.dims)) for s in model.graph.sparse_initializer)


def stage_outcome(model: onnx.ModelProto, work: onnx.ModelProto, config, *, selection: str, groups: list[dict],
                  skipped: list, shapes: dict, unit: str, group: str, extra: dict[str, Any] | None = None,
                  target: float | None = None):
    """The :class:`~fls_compress.pruning.stage.Outcome` of a structured stage (``unit`` removed from every
    ``group``, e.g. channels / group, heads / attention block): the new model ``work`` (checked by onnx when
    it serialises, under 2 GiB; above, verification still loads it) and the method_info that
    :func:`structure_sections` turns into the report's sections."""
    from ..io.onnx_model import model_size_bytes, prunable_initializers
    from ..pruning.stage import Outcome, is_excluded

    sites = prunable_initializers(model)
    layers = {s.name: (int(math.prod(s.shape)), list(s.shape), s.op_type) for s in sites}
    info = {
        "structure": config.structure, "selection": selection, "groups": groups,
        "skipped": [s.to_dict() for s in skipped], "shapes": {k: {"before": b, "after": a} for k, (b, a) in shapes.items()},
        "allocation": f"the same fraction of {unit} in every {group}"
                      + (f", kept counts rounded to multiples of {config.channel_multiple}" if config.channel_multiple > 1 else ""),
        **(extra or {}),
    }
    if selection == "obs":
        removed = "channel blocks" if unit == "channels" else unit
        info.update(sequential=bool(config.sequential), percdamp=config.percdamp,
                    max_rows_per_layer=config.max_rows_per_layer,
                    lazy_block=f"not used: structured OBS removes whole {removed} greedily (no lazy column blocks)")
    else:
        info["scope"] = f"not used: structured pruning removes the same fraction of {unit} in every {group}"
    if model_size_bytes(work) < 2**31 - 1:
        onnx.checker.check_model(work)
    excluded = sorted(s.name for s in sites if is_excluded(s.name, config.exclude))
    return Outcome(arrays={}, layers=layers, excluded=excluded, steps=[{"target": config.target if target is None else target}],
                   info=info, model=work)


def structure_sections(config, outcome, original: onnx.ModelProto, written: onnx.ModelProto,
                       latency: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(``sparsity``, ``structure``) report sections; the speed note quotes the report's ``latency`` block
    (:func:`fls_compress.latency.latency_block`: batch 1 and the evaluation batch)."""
    from ..io.onnx_model import model_size_bytes

    info = outcome.info  # the report's method_info: the per-group records move to the structure section
    groups, skipped, shapes = info.pop("groups"), info.pop("skipped"), info.pop("shapes")
    channels = sum(g["size"] for g in groups)
    removed = sum(g["size"] - g["kept"] for g in groups)
    per_layer = {}
    for name, (numel, shape, op) in outcome.layers.items():
        after = shapes.get(name, {}).get("after", shape)
        per_layer[name] = {"shape": shape, "shape_after": after, "numel": numel,
                           "numel_after": int(math.prod(after)), "op_type": op}
    before_w = sum(v["numel"] for v in per_layer.values())
    after_w = sum(v["numel_after"] for v in per_layer.values())
    sparsity = {
        "target": config.target, "pattern": None, "structure": config.structure,
        "achieved": removed / channels if channels else 0.0,
        "achieved_weights": 1.0 - after_w / before_w if before_w else 0.0,
        "prunable_weights": before_w, "prunable_weights_after": after_w,
        "per_layer": per_layer, "excluded": outcome.excluded,
    }
    params = {"original": parameter_count(original), "pruned": parameter_count(written)}
    params["ratio"] = params["pruned"] / params["original"] if params["original"] else None
    size = {"original": model_size_bytes(original), "pruned": model_size_bytes(written)}
    size["ratio"] = size["pruned"] / size["original"] if size["original"] else None
    how = (f"on onnxruntime the pruned model ran {latency['verdict']}" if latency.get("measured")
           else f"latency not measured ({latency.get('reason')})")
    note = (f"structured pruning removed {removed} of {channels} {config.structure} and "
            f"{params['original'] - params['pruned']} of {params['original']} parameters; {how}")
    structure = {
        "structure": config.structure, "selection": info["selection"], "groups": groups,
        "skipped": skipped, "channels": channels, "channels_removed": removed,
        "constants_promoted": info.pop("constants_promoted", 0), "splits_made_explicit": info.pop("splits_made_explicit", 0),
        "parameters": params, "size_bytes": size, "speed_note": note,
        "tensor_shapes": shapes,
    }
    return sparsity, structure
