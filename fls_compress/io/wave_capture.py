"""Chained capture of layer inputs for sequential layer-wise methods: every graph node runs once.

Sequential GPTQ / SparseGPT (see :mod:`fls_compress.pruning.layerwise`) need the inputs of wave k on
the model that already carries the new weights of waves 0..k-1. Running the whole model per wave costs
one forward pass per wave. Here each wave runs only the nodes its inputs still need: the backward
closure from the requested tensors, stopped at graph inputs, initializers and tensors cached from
earlier waves. Every tensor computed for wave k is an ancestor of wave k's inputs, so it depends only on
layers of waves < k, whose weights are final: it stays valid for all later waves. The closure's
frontier (its tensors read by nodes outside it) is therefore kept, for all calibration samples, and
later closures start from it; a cached tensor is dropped once every node reading it has run. Over all
waves each node runs once, as in one forward pass (the reference GPTQ implementation propagates
block inputs through each finished block the same way; Frantar et al. 2023, section 4 / Alg. 1).

The closure is a small ONNX model (the closure's nodes, the current weights as initializers, cached
tensors as inputs) run chunk by chunk with onnxruntime. The cache is bounded (:data:`CACHE_BYTES`):
when a wave's frontier would exceed it, :meth:`ChainedCapture.run` returns ``None`` before yielding
anything and the caller captures that wave and the rest as before (the whole model per wave).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .activations import _graph_inputs, input_batch_axes, ort_session, prepare_feeds, usable_samples

log = logging.getLogger(__name__)

#: bytes of cached tensors (all samples) at most; above it the caller falls back to whole-model passes
CACHE_BYTES = 2**30


def has_subgraphs(model: onnx.ModelProto) -> bool:
    """Nodes with graph attributes (If/Loop/Scan) read outer tensors implicitly: not chained."""
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for n in model.graph.node for a in n.attribute)


class ChainedCapture:
    """Per-wave captures over ``feeds`` that reuse the tensors computed for earlier waves (module doc)."""

    def __init__(self, model: onnx.ModelProto, feeds: dict[str, np.ndarray], *, chunk: int = 64,
                 budget_bytes: int = CACHE_BYTES):
        self.model = model
        self.nodes = list(model.graph.node)
        self.producer = {o: i for i, n in enumerate(self.nodes) for o in n.output if o}
        self.consumers: dict[str, set[int]] = {}
        for i, n in enumerate(self.nodes):
            for v in n.input:
                if v:
                    self.consumers.setdefault(v, set()).add(i)
        self.inits = {t.name: t for t in model.graph.initializer}
        self.input_infos = {vi.name: vi for vi in _graph_inputs(model)}
        self.feeds = prepare_feeds(model, feeds)
        n = int(next(iter(self.feeds.values())).shape[0]) if self.feeds else 0
        self.step, self.usable = usable_samples(model, n, chunk)
        if self.usable < n:
            log.warning("model takes batches of %d; using %d of %d calibration samples", self.step, self.usable, n)
        self.axes = input_batch_axes(model)
        self.budget = int(budget_bytes)
        self.cache: dict[str, list[np.ndarray]] = {}
        self.executed: set[int] = set()

    def _available(self, v: str) -> bool:
        return not v or v in self.cache or v in self.input_infos or v in self.inits

    def closure(self, values: list[str]) -> list[int]:
        """Indices (graph order) of the nodes to run so that ``values`` can be read."""
        need: set[int] = set()
        stack = [v for v in values if not self._available(v)]
        while stack:
            v = stack.pop()
            i = self.producer.get(v)
            if i is None:
                raise ValueError(f"tensor {v!r} has no producer, is not a graph input and is not cached")
            if i in need:
                continue
            need.add(i)
            stack.extend(x for x in self.nodes[i].input if not self._available(x))
        return sorted(need)

    def _submodel(self, nodes: list[int], outputs: list[str], weights: dict[str, np.ndarray]) -> tuple[onnx.ModelProto, list[str]]:
        reads = list(dict.fromkeys(x for i in nodes for x in self.nodes[i].input if x))
        made = {o for i in nodes for o in self.nodes[i].output}
        inputs = [x for x in reads if x not in made and x not in self.inits]
        infos = []
        for x in inputs:
            if x in self.input_infos:
                infos.append(self.input_infos[x])
            else:  # a cached tensor: element type only, any shape (the last chunk may be shorter)
                infos.append(helper.make_tensor_value_info(
                    x, helper.np_dtype_to_tensor_dtype(self.cache[x][0].dtype), None))
        inits = [numpy_helper.from_array(np.asarray(weights[x]), x) if x in weights else self.inits[x]
                 for x in reads if x in self.inits and x not in made]
        graph = helper.make_graph([self.nodes[i] for i in nodes], "wave", infos,
                                  [onnx.ValueInfoProto(name=o) for o in outputs], initializer=inits)
        sub = helper.make_model(graph, opset_imports=list(self.model.opset_import),
                                producer_name="fls-compress wave capture")
        sub.ir_version = self.model.ir_version
        sub.functions.extend(self.model.functions)
        return sub, inputs

    def _chunk_feed(self, name: str, index: int, start: int) -> np.ndarray:
        if name in self.cache:
            return self.cache[name][index]
        part = self.feeds[name][start : start + self.step]
        return np.moveaxis(part, 0, self.axes[name]) if name in self.axes else part

    def run(self, values: list[str], weights: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]] | None:
        """Chunks of ``values`` (model layout) on the model whose layer weights are ``weights`` (the others
        as in the graph), or ``None`` when caching this wave's frontier would exceed the budget."""
        values = list(dict.fromkeys(values))
        nodes = self.closure(values)
        inside = set(nodes)
        made = [o for i in nodes for o in self.nodes[i].output if o]
        frontier = [o for o in made if self.consumers.get(o, set()) - inside]  # read later: cached
        fetch = list(dict.fromkeys(frontier + [v for v in values if v in made]))  # the rest: yielded only
        starts = list(range(0, self.usable, self.step))
        sub, inputs = self._submodel(nodes, fetch, weights) if nodes else (None, [])
        session = ort_session(sub) if sub is not None else None
        first = dict(zip(fetch, session.run(fetch, {x: self._chunk_feed(x, 0, 0) for x in inputs}))) if session else {}
        per_chunk = sum(first[o].nbytes for o in frontier)
        held = sum(a.nbytes for parts in self.cache.values() for a in parts)
        if held + per_chunk * len(starts) > self.budget:
            log.info("chained capture: caching %.0f MB more would exceed %.0f MB; whole-model passes from here",
                     per_chunk * len(starts) / 2**20, self.budget / 2**20)
            return None
        return self._iterate(values, nodes, frontier, fetch, inputs, session, first, starts)

    def _iterate(self, values, nodes, frontier, fetch, inputs, session, first, starts) -> Iterator[dict[str, np.ndarray]]:
        for o in frontier:
            self.cache[o] = []
        for index, start in enumerate(starts):
            if index == 0 or session is None:
                got = first
            else:
                got = dict(zip(fetch, session.run(fetch, {x: self._chunk_feed(x, index, start) for x in inputs})))
            for o in frontier:
                self.cache[o].append(got[o])
            yield {v: got[v] if v in got else self._chunk_feed(v, index, start) for v in values}
        self.executed.update(nodes)
        for v in [v for v in self.cache if self.consumers.get(v, set()) <= self.executed]:
            del self.cache[v]  # every reader has run (values requested for later are read by layers not run yet)
