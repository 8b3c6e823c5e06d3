"""Running a layer-wise method over a whole ONNX graph, and the base class of the layer-wise pruners.

Layer-wise methods (SparseGPT, Wanda, GPTQ) only need each layer's calibration INPUTS, captured with
onnxruntime by :mod:`fls_compress.io.activations` - no torch conversion, no gradients, no labels - so
they also run on graphs onnx2torch cannot convert (``prune_arrays``).

Sequential mode (default, as in the reference implementations of SparseGPT and GPTQ): layers are
processed in waves in graph order; a wave holds the layers whose inputs do not depend on any layer not
yet processed, and its inputs are recaptured on the model that already carries the new weights of the
earlier waves (layers sharing an input - e.g. Q/K/V - are one wave). One onnxruntime session serves
every wave: the layer weights are made overridable graph inputs and the already-changed ones are fed
with each run. ``sequential=False`` captures every input once on the original model.

Sparsity allocation: these methods are uniform per layer by design (the papers' setting). A target s
prunes ceil(s * total) weights overall, split over the layers by largest remainder so that every layer
gets s up to one weight; ``spec.scope`` and ``spec.steps`` are NOT used (one-shot, uniform) and the
result's ``info`` says so. Under N:M, layers whose reduction axis (Conv: input channels per group) is
not a multiple of M stay dense (warning, ``info["nm_dense_layers"]``); 3-D convolutions stay dense
(``info["unsupported_layers"]``).
"""

from __future__ import annotations

import logging
import math
import zlib
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ..curvature.problem import FisherProblem
from ..errors import InvalidOptionError, UnsupportedModelError
from ..io.activations import (
    ActivationSession,
    LayerUse,
    conv_groups,
    from_matrix,
    layer_sites,
    matrix_shape,
    prepare_feeds,
    to_matrix,
    usable_samples,
)
from ..io.layer_rows import DEFAULT_MAX_ROWS, RowStatistics, conv_supported, count_rows
from ..io.onnx_model import PrunableSite, densify_sparse_initializers, read_initializer_arrays
from ..io.wave_capture import ChainedCapture, has_subgraphs
from ..stage_clock import StageClock
from .base import ProgressFn, PruneResult, PruneStep, Pruner, SparsitySpec
from .selection import allocate_counts, nm_groupable, nm_layout

log = logging.getLogger(__name__)

#: transform(name, site, uses, stats, current ONNX array) -> new ONNX array (same shape and dtype)
LayerTransform = Callable[[str, PrunableSite, list[LayerUse], RowStatistics, np.ndarray], np.ndarray]


@dataclass
class LayerRows:
    """Rows of X a layer's statistics were computed from."""

    used: int
    total: int

    @property
    def subsampled(self) -> bool:
        return self.used < self.total


def tensor_dependencies(model: onnx.ModelProto, uses: dict[str, list[LayerUse]]) -> dict[str, frozenset[str]]:
    """For every tensor computed by a node, the layers whose weights influence it."""
    consumers: dict[int, set[str]] = {}
    for name, us in uses.items():
        for use in us:
            consumers.setdefault(use.node_index, set()).add(name)
    deps: dict[str, frozenset[str]] = {}
    empty: frozenset[str] = frozenset()
    for index, node in enumerate(model.graph.node):
        d: set[str] = set()
        for value in node.input:
            d |= deps.get(value, empty)
        d |= consumers.get(index, set())
        fd = frozenset(d)
        for out in node.output:
            deps[out] = fd
    return deps


def _dependencies(model: onnx.ModelProto, uses: dict[str, list[LayerUse]]) -> dict[str, set[str]]:
    """For every layer, the other layers whose weights influence its input activations."""
    deps = tensor_dependencies(model, uses)
    empty: frozenset[str] = frozenset()
    return {name: set().union(*(deps.get(u.activation, empty) for u in us)) - {name} for name, us in uses.items()}


def layer_waves(model: onnx.ModelProto, uses: dict[str, list[LayerUse]], sequential: bool) -> list[list[str]]:
    """Groups of layers processed together (see module doc)."""
    order = sorted(uses, key=lambda n: uses[n][0].node_index)
    if not sequential:
        return [order]
    deps = _dependencies(model, uses)
    done: set[str] = set()
    waves: list[list[str]] = []
    remaining = list(order)
    while remaining:
        wave = [n for n in remaining if deps[n] <= done] or list(remaining)  # a cycle via a tied weight
        waves.append(wave)
        done |= set(wave)
        remaining = [n for n in remaining if n not in done]
    return waves


def _waves_ordered(waves: list[list[str]], deps: dict[str, set[str]]) -> bool:
    """Every layer's input depends only on layers of earlier waves (not so for a cycle via a tied weight)."""
    done: set[str] = set()
    for wave in waves:
        if any(not deps[n] <= done for n in wave):
            return False
        done |= set(wave)
    return True


def sweep_layers(
    model: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    names: list[str],
    transform: LayerTransform,
    *,
    full: bool,
    arrays: dict[str, np.ndarray] | None = None,
    sequential: bool = True,
    chunk: int = 64,
    max_rows: int | None = DEFAULT_MAX_ROWS,
    seed: int = 0,
    progress: ProgressFn | None = None,
    label: str = "layer-wise",
    observe: Callable[[str, np.ndarray], None] | None = None,
    observed: Sequence[str] = (),
    clock: StageClock | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, LayerRows]]:
    """Apply ``transform`` to every named weight from its captured input statistics (wave by wave).

    ``arrays`` overrides initial weight values (ONNX layout). Returns the new arrays and the rows of
    X used per layer. Row subsampling: the stream length of each layer is extrapolated from the first
    chunk (rows are proportional to samples), then :class:`RowStatistics` keeps ``max_rows`` of them.

    Sequential waves are captured chained (:mod:`fls_compress.io.wave_capture`: each node runs once);
    otherwise, or past the chain's cache budget, one session runs the whole model per wave with the
    changed weights fed. ``observe(tensor, chunk)`` receives every chunk of each tensor of ``observed``
    computed with the final weights of every layer it depends on, while chained (at the wave after its
    last such layer, or one closing pass); a tensor it received nothing for is the caller's to compute.
    ``clock`` gets the stages ``capture`` (onnxruntime), ``hessian`` (rows, X^T X), ``transform``.
    """
    clock = clock or StageClock()
    work = densify_sparse_initializers(model) if model.graph.sparse_initializer else model
    inits = {t.name: t for t in work.graph.initializer}
    sites, uses = layer_sites(work, list(names))
    current = {n: numpy_helper.to_array(inits[n]) for n in names}
    fed: dict[str, np.ndarray] = {}  # weights whose value differs from the initializer: fed to the session
    for n, arr in (arrays or {}).items():
        if n in current:
            current[n] = fed[n] = np.asarray(arr, dtype=current[n].dtype).reshape(current[n].shape)
    feeds = prepare_feeds(work, feeds)
    n_samples = int(next(iter(feeds.values())).shape[0]) if feeds else 0
    waves = layer_waves(work, uses, sequential)
    all_values = [u.activation for n in names for u in uses[n]]
    chain = None
    if names and sequential and not has_subgraphs(work) and _waves_ordered(waves, _dependencies(work, uses)):
        chain = ChainedCapture(work, feeds, chunk=chunk)
    session: ActivationSession | None = None
    tdeps = tensor_dependencies(work, uses)
    pending = list(dict.fromkeys(observed)) if chain is not None and observe is not None else []
    rows_info: dict[str, LayerRows] = {}
    done_layers: set[str] = set()
    done = 0
    for wave in waves:
        values = [u.activation for n in wave for u in uses[n]]
        ready = [t for t in pending if tdeps.get(t, frozenset()) <= done_layers]
        pending = [t for t in pending if t not in ready]
        stats = {}
        for n in wave:
            cols = to_matrix(sites[n], uses[n][0], current[n]).shape[1]
            layer_seed = (int(seed) * 1_000_003 + zlib.crc32(n.encode())) % 2**32
            stats[n] = RowStatistics(conv_groups(sites[n], uses[n][0]), cols, full=full, max_rows=max_rows, seed=layer_seed)
        with clock("capture"):
            chunks = chain.run(values + ready, current) if chain is not None else None
        if chunks is None:
            chain, ready, pending = None, [], []
            if session is None:
                with clock("capture"):
                    session = ActivationSession(work, all_values, overridable=list(names))
                if set(names) - session.overridable:
                    raise UnsupportedModelError("onnxruntime does not let the layer weights be fed (IR version < 4?); "
                                                "re-export the model with IR version >= 4")
            chunks = session.iterate(feeds, values, chunk=chunk, overrides=fed)
        first = True
        for acts in clock.iterate("capture", chunks):
            for t in ready:
                observe(t, acts[t])  # type: ignore[misc]
            with clock("hessian"):
                if first:
                    first = False
                    chunk_n = int(np.asarray(next(iter(acts.values()))).shape[0]) if acts else 1
                    _, usable = usable_samples(work, n_samples, chunk)
                    for n in wave:
                        per_chunk = sum(count_rows(sites[n], u, tuple(acts[u.activation].shape)) for u in uses[n])
                        stats[n].plan(int(math.ceil(per_chunk * usable / max(chunk_n, 1))))
                for n in wave:
                    for use in uses[n]:
                        stats[n].add_activation(sites[n], use, acts[use.activation])
        for n in wave:
            with clock("transform"):
                new = np.asarray(transform(n, sites[n], uses[n], stats[n], current[n]))
            if new.shape != current[n].shape or new.dtype != current[n].dtype:
                raise ValueError(f"{label}: transform changed the shape/dtype of {n!r}")
            current[n] = new
            if sequential:  # later waves see this layer's new weights
                fed[n] = new
            rows_info[n] = LayerRows(stats[n].rows_used, stats[n].rows_total)
            if rows_info[n].subsampled:
                log.info("%s: %s statistics from %d of %d rows (random subsample)", label, n,
                         rows_info[n].used, rows_info[n].total)
            done += 1
            if progress:
                progress(f"{label}: layer {done}/{len(names)} ({n})")
        done_layers |= set(wave)
    if chain is not None and pending:  # tensors that depend on the last wave: one closing pass
        with clock("capture"):
            chunks = chain.run(pending, current)
        for acts in clock.iterate("capture", chunks) if chunks is not None else ():
            for t in pending:
                observe(t, acts[t])  # type: ignore[misc]
    return current, rows_info


def rows_info_fields(rows: dict[str, LayerRows]) -> dict[str, float | str]:
    """Report fields: summed rows used / available and which layers were subsampled."""
    return {
        "rows_used": float(sum(r.used for r in rows.values())),
        "rows_total": float(sum(r.total for r in rows.values())),
        "rows_per_layer": ", ".join(f"{n}={r.used}/{r.total}" for n, r in rows.items()),
        "rows_subsampled_layers": float(sum(r.subsampled for r in rows.values())),
    }


class LayerwisePruner(Pruner):
    """Base of the activation-driven pruners; needs the ONNX model (``bind`` it or pass it).

    Subclasses set ``method`` and ``full_hessian`` and implement :meth:`prune_matrix`.
    """

    #: the registry factory cannot know the ONNX model; the caller must ``bind`` it
    needs_onnx_model = True
    method = ""
    full_hessian = True

    def __init__(self, onnx_model: onnx.ModelProto | None = None, *, num_samples: int = 512,
                 max_rows_per_layer: int | None = DEFAULT_MAX_ROWS, sequential: bool = True, chunk: int = 64,
                 seed: int = 0):
        if max_rows_per_layer is not None and max_rows_per_layer < 1:
            raise InvalidOptionError(f"max_rows_per_layer must be >= 1, got {max_rows_per_layer}")
        self.onnx_model = onnx_model
        self.num_samples = int(num_samples)
        self.max_rows_per_layer = max_rows_per_layer
        self.sequential = bool(sequential)
        self.chunk = int(chunk)
        self.seed = int(seed)
        self.name = self.method
        self.last_info: dict[str, float | str] = {}

    def bind(self, onnx_model: onnx.ModelProto) -> "LayerwisePruner":
        """Attach the original ONNX model (returns ``self``)."""
        self.onnx_model = onnx_model
        return self

    def _model(self) -> onnx.ModelProto:
        if self.onnx_model is None:
            raise InvalidOptionError(f"{self.name} needs the ONNX model: call bind(onnx_model) first")
        return self.onnx_model

    def prune_matrix(self, w: torch.Tensor, stats: RowStatistics, group: int, *, prune_count: int,
                     nm: tuple[int, int] | None, alive: torch.Tensor,
                     col_order: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Prune one (rows, cols) group of a layer; returns (W', keep)."""
        raise NotImplementedError

    def prune_arrays_and_masks(
        self, calib_inputs: dict[str, np.ndarray], spec: SparsitySpec, names: list[str] | None = None, *,
        arrays: dict[str, np.ndarray] | None = None, masks: dict[str, np.ndarray] | None = None,
        progress: ProgressFn | None = None,
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Pruned arrays and keep masks (True = alive), ONNX layout, of every Conv/Gemm/MatMul weight
        (or ``names``); fills :attr:`last_info`."""
        model = self._model()
        feeds = {k: np.asarray(v)[: self.num_samples] for k, v in calib_inputs.items()}
        sites, uses = layer_sites(model, names)
        info: dict[str, float | str] = {
            "scope": "not used: layer-wise methods prune every layer to the same sparsity",
            "steps": "not used: one-shot method",
        }
        keep = {n: np.ones(s.shape, dtype=bool) if masks is None or n not in masks else np.asarray(masks[n], bool)
                for n, s in sites.items()}
        active = [n for n, s in sites.items() if conv_supported(s) and uses[n]]
        unsupported = [n for n in sites if n not in active]
        for n in unsupported:
            log.warning("%s: %r (%d-D kernel) is not supported and stays dense", self.name, n, len(sites[n].shape) - 2)
        info["unsupported_layers"] = ", ".join(unsupported)
        nm = spec.nm
        layout = {n: nm_layout(sites[n].op_type, sites[n].shape, matrix_shape(sites[n], uses[n][0])[1]) for n in active}
        if nm is not None:
            dense = [n for n in active if not nm_groupable(layout[n][0], nm[1])]
            for n in dense:
                log.warning("%s: %r has %d input channels, not a multiple of %d; N:M leaves it dense",
                            self.name, n, layout[n][0], nm[1])
            info["nm_dense_layers"] = ", ".join(dense)
            active = [n for n in active if n not in dense]
            counts = {n: 0 for n in active}
        else:
            sizes = [int(np.prod(sites[n].shape)) for n in active]
            counts = dict(zip(active, allocate_counts(math.ceil(spec.sparsity * sum(sizes) - 1e-9), sizes)))

        def transform(n: str, site: PrunableSite, us: list[LayerUse], stats: RowStatistics, arr: np.ndarray) -> np.ndarray:
            use = us[0]
            mat = torch.from_numpy(np.array(to_matrix(site, use, arr), dtype=np.float64))
            alive = torch.from_numpy(np.array(to_matrix(site, use, keep[n]), dtype=bool))
            g = conv_groups(site, use)
            rows_per = mat.shape[0] // g
            group_counts = allocate_counts(counts[n], [rows_per * mat.shape[1]] * g) if nm is None else [0] * g
            new_w, new_keep = mat.clone(), alive.clone()
            for gi in range(g):
                r = slice(gi * rows_per, (gi + 1) * rows_per)
                new_w[r], new_keep[r] = self.prune_matrix(mat[r], stats, gi, prune_count=group_counts[gi], nm=nm,
                                                          alive=alive[r], col_order=layout[n][1])
            new_w = new_w * new_keep
            keep[n] = from_matrix(site, use, new_keep.numpy())
            log.info("%s: %s pruned to %.4f", self.name, n, 1.0 - float(keep[n].mean()))
            return from_matrix(site, use, new_w.numpy()).astype(arr.dtype)

        new_arrays, rows = sweep_layers(model, feeds, active, transform, full=self.full_hessian, arrays=arrays,
                                        sequential=self.sequential, chunk=self.chunk,
                                        max_rows=self.max_rows_per_layer, seed=self.seed, progress=progress,
                                        label=self.name)
        base = read_initializer_arrays(model)
        out = {}
        for n in sites:
            if n in new_arrays:
                out[n] = new_arrays[n]
            elif arrays is not None and n in arrays:  # left dense: the given value
                out[n] = np.asarray(arrays[n], dtype=base[n].dtype).reshape(base[n].shape)
            else:
                out[n] = base[n]
        info.update(rows_info_fields(rows))
        info["num_samples"] = float(min(self.num_samples, int(next(iter(prepare_feeds(model, feeds).values())).shape[0])))
        info["sequential"] = "yes" if self.sequential else "no"
        info["max_rows_per_layer"] = float(self.max_rows_per_layer or 0)
        self.last_info = info
        return out, keep

    def prune_arrays(self, calib_inputs: dict[str, np.ndarray], spec: SparsitySpec,
                     names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Torch-free pruning of the bound model: pruned initializer arrays (ONNX layout and dtype).

        Write them back with :func:`fls_compress.io.onnx_model.write_back`; ``last_info`` holds the report.
        """
        return self.prune_arrays_and_masks(calib_inputs, spec, names)[0]

    def prune(self, problem: FisherProblem, spec: SparsitySpec, progress: ProgressFn | None = None) -> PruneResult:
        self._model()
        n = min(self.num_samples, problem.num_samples)
        arrays = {name: w.to_onnx() for name, w in problem.weights.items()}
        masks = {name: w.to_onnx(problem.masks[name].to(torch.float64)) != 0 for name, w in problem.weights.items()}
        new_arrays, new_masks = self.prune_arrays_and_masks({k: v[:n] for k, v in problem.inputs.items()}, spec,
                                                            problem.names, arrays=arrays, masks=masks,
                                                            progress=progress)
        with torch.no_grad():
            for name, w in problem.weights.items():
                keep = _onnx_to_parameter(w, new_masks[name], scaled=False).bool()
                problem.masks[name] = problem.masks[name] & keep
                value = _onnx_to_parameter(w, new_arrays[name].astype(np.float64), scaled=True)
                w.parameter.copy_(value.to(w.parameter.dtype))
        problem.apply_masks()
        result = PruneResult(self.name, problem.masks)
        result.steps.append(PruneStep(spec.sparsity, problem.sparsity()))
        result.info.update(self.last_info)
        log.info("%s: sparsity %.4f (target %.4f)", self.name, problem.sparsity(), spec.sparsity)
        return result


def _onnx_to_parameter(w, arr: np.ndarray, *, scaled: bool) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(arr))
    if w.transpose:
        t = t.t()
    t = t.reshape(w.parameter.shape)
    return t * w.scale if scaled and w.scale != 1.0 else t
