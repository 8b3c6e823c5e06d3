"""The report sections of a structured prune: what shrank, parameters, size and onnxruntime latency."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx

LATENCY_BATCHES = (1, 64)


def parameter_count(model: onnx.ModelProto) -> int:
    """Elements of every initializer (dense and sparse) of the top-level graph."""
    dense = sum(int(math.prod(t.dims)) for t in model.graph.initializer)
    return dense + sum(int(math.prod(s.dims)) for s in model.graph.sparse_initializer)


def structure_sections(config, outcome, original: onnx.ModelProto, written: onnx.ModelProto,
                       holdout) -> tuple[dict[str, Any], dict[str, Any]]:
    """(``sparsity``, ``structure``) report sections. Latency: :func:`fls_compress.latency.compare_latency`
    at batch 1 and 64 (or the held-out size when smaller), on the held-out inputs."""
    from ..io.onnx_model import model_size_bytes
    from ..latency import compare_latency
    from ..runtime import session_providers

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
    latency: dict[str, Any] = {}
    n = int(next(iter(holdout.inputs.values())).shape[0]) if holdout.inputs else 0
    for batch in sorted({min(b, n) for b in LATENCY_BATCHES if n}):
        feed = {k: np.ascontiguousarray(v[:batch]) for k, v in holdout.inputs.items()}
        latency[f"batch_{batch}"] = compare_latency(original, written, feed, providers=session_providers())
    verdicts = [f"{v['speedup']:.2f}x the original's speed at batch {v['batch']}" for v in latency.values()]
    note = (f"structured pruning removed {removed} of {channels} {config.structure} and "
            f"{params['original'] - params['pruned']} of {params['original']} parameters; on "
            f"{next(iter(latency.values()))['provider'] if latency else 'onnxruntime'} the pruned model ran "
            + ", ".join(verdicts) if verdicts else "no held-out inputs to time")
    structure = {
        "structure": config.structure, "selection": info["selection"], "groups": groups,
        "skipped": skipped, "channels": channels, "channels_removed": removed,
        "parameters": params, "size_bytes": size, "latency": latency, "speed_note": note,
        "tensor_shapes": shapes,
    }
    return sparsity, structure
