"""Layer-wise, data-driven pruning from captured layer inputs: SparseGPT and Wanda.

Both methods only need each prunable layer's calibration INPUTS X (one row per token / spatial
position, one column per input feature of the (out, in) matrix view), captured generically from the
ONNX graph with onnxruntime - no torch conversion, no gradients, no labels. They therefore also run on
graphs onnx2torch cannot convert (:func:`prune_arrays`).

Layer-wise objective (OBC / SparseGPT, team memo ``baselines_ief.md`` section 4.1):
min over W' of ||W X^T - W' X^T||_F^2, separable over output rows with the common Hessian
H = 2 X^T X / n (n = number of rows of X).

* **SparseGPT** (Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
  One-Shot", ICML 2023; memo 4.3). Damping H += percdamp * mean(diag H) I (dead inputs, H_jj = 0, are left at
  0 before damping - see :func:`_inverse_cholesky_upper`). With U the upper Cholesky factor of H^-1 (H^-1 = U^T U), the OBS quantities of column i
  after columns < i are fixed are rows of U: saliency w_ri^2 / U_ii^2 and update
  err_r = (w_ri - q_ri) / U_ii, W[r, i:] -= err_r U[i, i:]. Columns are swept in lazy blocks of
  ``blocksize`` (128): updates inside a block touch only the block, then W[:, i2:] -= E U[i1:i2, i2:]
  (one GEMM). Adaptive mask selection: at the start of each column block, the block's entries with the
  smallest w^2 / U_ii^2 (current, already compensated weights) are pruned; block quotas are set by
  cumulative rounding so the layer reaches exactly its prune count. N:M: every M consecutive columns,
  each row prunes its N smallest w^2 / U_ii^2 (N = number pruned, 2:4 = 2 zeros in every 4).
* **Wanda** (Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for Large Language
  Models", ICLR 2024; memo section 5). Score S_ij = |W_ij| ||X_j||_2 (OBD with diag of the layer
  Hessian), compared within each output row, the lowest fraction of every row pruned; N:M within
  every M consecutive columns of a row. No weight update.

Layer inputs (:func:`capture_layer_inputs`, :func:`layer_input_rows`): for each prunable initializer
its consumer nodes are found (through ``Identity`` chains), their activation input is exposed as an
extra graph output of a model copy, and onnxruntime runs the calibration samples in chunks. Rows:
MatMul ``X @ W`` -> X flattened to (-1, in); MatMul ``W @ X`` -> the last two axes of X swapped, then
flattened; Gemm -> A (A^T when ``transA=1``); Conv (1-D and 2-D) -> im2col with
``torch.nn.functional.unfold`` using the node's kernel_shape / strides / pads / dilations / auto_pad,
one Hessian per group when ``group > 1`` (depthwise included). 3-D convolutions are left dense with a
warning. A weight used by several nodes accumulates the inputs of every use with the same role.
Statistics (X^T X per group, float64) are accumulated chunk by chunk; X is never stored whole.

Sequential mode (default, as in the reference implementations): layers are processed in waves in
graph order; a wave holds the layers whose inputs do not depend on any layer not yet pruned, and its
inputs are recaptured on the model that already carries the pruned weights of earlier waves (layers
sharing an input - e.g. Q/K/V - are one wave). ``sequential=False`` captures every input once on the
original model (one pass).

Sparsity allocation: these methods are uniform per layer by design (the papers' setting). A global
target s prunes ceil(s * total) weights overall (as ``select_global``), split over the layers by largest remainder so that
every layer gets s up to one weight and the total is exact; ``spec.scope`` does not change this and
``spec.steps`` is not used (one-shot). Layers whose input width is not a multiple of M stay dense
under N:M (as :func:`~fls_compress.pruning.selection.select_n_of_m` does). N:M groups run along the
columns of the (out, in) matrix view, i.e. for Conv along the flattened (C_in/g, kh, kw) axis - the
repo-wide convention.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

from ..bridge.weights import PrunableWeight
from ..curvature.problem import FisherProblem
from ..errors import InvalidDataError, InvalidOptionError, UnsupportedModelError
from ..io.onnx_model import densify_sparse_initializers, identity_sources
from .base import ProgressFn, PruneResult, PruneStep, Pruner, SparsitySpec

log = logging.getLogger(__name__)

LAYER_OPS = ("Conv", "Gemm", "MatMul")
_ROW_CHUNK_FLOATS = 2e7  # elements of X processed at once


# ------------------------------------------------------------------------------------------------
# Graph analysis
# ------------------------------------------------------------------------------------------------
@dataclass
class LayerUse:
    """One node reading a prunable initializer as a layer weight."""

    node: onnx.NodeProto
    node_index: int
    activation: str
    weight_position: int


@dataclass
class LayerSite:
    """A prunable initializer, its ONNX array layout and the nodes that use it as a weight."""

    name: str
    op_type: str
    shape: tuple[int, ...]
    dtype: np.dtype
    elem_type: int
    uses: list[LayerUse] = field(default_factory=list)

    @property
    def first(self) -> LayerUse:
        return self.uses[0]

    def attr(self, key: str, default: object = None) -> object:
        return _node_attr(self.first.node, key, default)

    @property
    def groups(self) -> int:
        return int(self.attr("group", 1)) if self.op_type == "Conv" else 1

    @property
    def supported(self) -> bool:
        return not (self.op_type == "Conv" and len(self.shape) not in (3, 4))

    # (out, in) matrix view of the ONNX array (same convention as PrunableWeight.to_matrix)
    def to_matrix(self, arr: np.ndarray) -> np.ndarray:
        if self.op_type == "Conv":
            return arr.reshape(arr.shape[0], -1)
        if self.op_type == "Gemm":
            return arr if int(self.attr("transB", 0)) else arr.T
        return arr.T if self.first.weight_position == 1 else arr

    def from_matrix(self, mat: np.ndarray) -> np.ndarray:
        if self.op_type == "Conv":
            return mat.reshape(self.shape)
        if self.op_type == "Gemm":
            return mat if int(self.attr("transB", 0)) else mat.T
        return mat.T if self.first.weight_position == 1 else mat


def _node_attr(node: onnx.NodeProto, key: str, default: object = None) -> object:
    for a in node.attribute:
        if a.name == key:
            value = helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _role(node: onnx.NodeProto, position: int) -> str:
    if node.op_type == "Gemm":
        return f"Gemm:{[helper.get_attribute_value(a) for a in node.attribute if a.name == 'transB']}"
    return f"{node.op_type}:{position}"


def find_layer_sites(model: onnx.ModelProto, names: list[str] | None = None) -> dict[str, LayerSite]:
    """Prunable initializers (Conv kernel, Gemm B, MatMul constant operand) and their weight uses.

    ``names`` restricts (and orders by first use) the result; an unknown or unused name raises
    :class:`InvalidOptionError`.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    sources = identity_sources(graph, set(inits))
    sites: dict[str, LayerSite] = {}
    roles: dict[str, str] = {}
    for index, node in enumerate(graph.node):
        if node.domain not in ("", "ai.onnx") or node.op_type not in LAYER_OPS:
            continue
        hits: list[tuple[str, int, str]] = []
        if node.op_type in ("Conv", "Gemm") and len(node.input) > 1:
            hits.append((sources.get(node.input[1], node.input[1]), 1, node.input[0]))
        elif node.op_type == "MatMul" and len(node.input) == 2:
            left, right = (sources.get(v, v) for v in node.input)
            if right in inits and left not in inits:
                hits.append((right, 1, node.input[0]))
            elif left in inits and right not in inits:
                hits.append((left, 0, node.input[1]))
        for wname, pos, act in hits:
            tensor = inits.get(wname)
            if tensor is None or (names is not None and wname not in names):
                continue
            if node.op_type in ("Gemm", "MatMul") and len(tensor.dims) != 2:
                continue
            role = _role(node, pos)
            if wname not in sites:
                sites[wname] = LayerSite(
                    wname,
                    node.op_type,
                    tuple(int(d) for d in tensor.dims),
                    np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)),
                    tensor.data_type,
                )
                roles[wname] = role
            elif roles[wname] != role:
                log.warning("weight %r is also read by node %r in another role; that use is ignored", wname, node.name)
                continue
            sites[wname].uses.append(LayerUse(node, index, act, pos))
    if names is not None:
        missing = [n for n in names if n not in sites]
        if missing:
            raise InvalidOptionError(f"not a Conv/Gemm/MatMul weight of the graph: {', '.join(missing)}")
    return sites


def _dependencies(model: onnx.ModelProto, sites: dict[str, LayerSite]) -> dict[str, set[str]]:
    """For every site, the other sites whose weights influence its input activations."""
    consumers: dict[int, set[str]] = {}
    for name, site in sites.items():
        for use in site.uses:
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
    return {
        name: set().union(*(deps.get(u.activation, empty) for u in site.uses)) - {name}
        for name, site in sites.items()
    }


def _waves(model: onnx.ModelProto, sites: dict[str, LayerSite], sequential: bool) -> list[list[str]]:
    order = sorted(sites, key=lambda n: sites[n].first.node_index)
    if not sequential:
        return [order]
    deps = _dependencies(model, sites)
    done: set[str] = set()
    waves: list[list[str]] = []
    remaining = list(order)
    while remaining:
        wave = [n for n in remaining if deps[n] <= done]
        if not wave:  # a cycle through a tied weight: take the rest at once
            wave = list(remaining)
        waves.append(wave)
        done |= set(wave)
        remaining = [n for n in remaining if n not in done]
    return waves


# ------------------------------------------------------------------------------------------------
# Running onnxruntime
# ------------------------------------------------------------------------------------------------
def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in inits]


def _static_batch(model: onnx.ModelProto) -> int | None:
    """The static leading dimension of the graph inputs, if any (then batches must have that size)."""
    for vi in _graph_inputs(model):
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            return int(dims[0].dim_value)
    return None


def _prepare_feeds(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [vi.name for vi in _graph_inputs(model)]
    missing = [n for n in names if n not in feeds]
    if missing:
        raise InvalidDataError(f"calibration data lacks model input(s): {', '.join(missing)}")
    out = {n: np.asarray(feeds[n]) for n in names}
    counts = {int(a.shape[0]) if a.ndim else 1 for a in out.values()}
    if len(counts) != 1:
        raise InvalidDataError("calibration inputs disagree on the number of samples")
    return out


def _iter_activations(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray], values: list[str], elem_types: dict[str, int], chunk: int
) -> Iterator[dict[str, np.ndarray]]:
    """Run ``model`` over the feeds in chunks; yield the requested intermediate values per chunk."""
    import onnxruntime as ort

    feeds = _prepare_feeds(model, feeds)
    input_names = set(feeds)
    existing = {vi.name for vi in model.graph.output}
    wanted = [v for v in dict.fromkeys(values) if v not in input_names]
    added = [v for v in wanted if v not in existing]
    for v in added:
        model.graph.output.append(helper.make_tensor_value_info(v, elem_types[v], None))
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises many types
        raise UnsupportedModelError(f"onnxruntime cannot run the model to capture layer inputs: {exc}") from exc
    finally:
        if added:
            del model.graph.output[len(model.graph.output) - len(added) :]
    n = int(next(iter(feeds.values())).shape[0])
    static = _static_batch(model)
    step = static if static is not None else max(int(chunk), 1)
    usable = (n // step) * step if static is not None else n
    if usable < n:
        log.warning("model takes batches of %d; using %d of %d calibration samples", step, usable, n)
    for start in range(0, usable, step):
        part = {k: v[start : start + step] for k, v in feeds.items()}
        outs = sess.run(wanted, part) if wanted else []
        got = dict(zip(wanted, outs))
        yield {v: (part[v] if v in input_names else got[v]) for v in values}


def capture_layer_inputs(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray], names: list[str], *, chunk: int = 64
) -> dict[str, np.ndarray]:
    """The activation input of each named weight's first consumer node, over all calibration samples.

    Arrays are in the ONNX layout of that node's activation input, chunks concatenated along axis 0.
    """
    work = densify_sparse_initializers(model)
    sites = find_layer_sites(work, list(names))
    values = [sites[n].first.activation for n in names]
    types = {sites[n].first.activation: sites[n].elem_type for n in names}
    parts: dict[str, list[np.ndarray]] = {v: [] for v in values}
    for acts in _iter_activations(work, feeds, values, types, chunk):
        for v in dict.fromkeys(values):
            parts[v].append(np.asarray(acts[v]))
    return {n: np.concatenate(parts[sites[n].first.activation], axis=0) for n in names}


# ------------------------------------------------------------------------------------------------
# Layer-input rows
# ------------------------------------------------------------------------------------------------
def _conv_pads(site: LayerSite, spatial_in: list[int], kernel: list[int], strides: list[int], dil: list[int]) -> list[tuple[int, int]]:
    auto = str(site.attr("auto_pad", "NOTSET"))
    nd = len(kernel)
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for i in range(nd):
            out = math.ceil(spatial_in[i] / strides[i])
            total = max((out - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1 - spatial_in[i], 0)
            small, big = total // 2, total - total // 2
            pads.append((small, big) if auto == "SAME_UPPER" else (big, small))
        return pads
    if auto == "VALID":
        return [(0, 0)] * nd
    raw = list(site.attr("pads", [0] * (2 * nd)))
    return [(int(raw[i]), int(raw[i + nd])) for i in range(nd)]


def _im2col(site: LayerSite, x: torch.Tensor) -> torch.Tensor:
    """Conv input (N, C, *spatial) -> (groups, N * L, C/groups * prod(kernel)), unfold column order."""
    nd = len(site.shape) - 2
    kernel = [int(k) for k in site.attr("kernel_shape", list(site.shape[2:]))]
    strides = [int(s) for s in site.attr("strides", [1] * nd)]
    dil = [int(d) for d in site.attr("dilations", [1] * nd)]
    pads = _conv_pads(site, list(x.shape[2:]), kernel, strides, dil)
    if nd == 1:
        x = x.unsqueeze(2)
        kernel, strides, dil, pads = [1] + kernel, [1] + strides, [1] + dil, [(0, 0)] + pads
    flat_pad: list[int] = []
    for lo, hi in reversed(pads):
        flat_pad += [lo, hi]
    if any(flat_pad):
        x = F.pad(x, flat_pad)
    cols = F.unfold(x, kernel_size=kernel, dilation=dil, stride=strides)  # (N, C*prod(k), L)
    n, ck, length = cols.shape
    g = site.groups
    return cols.transpose(1, 2).reshape(n * length, g, ck // g).transpose(0, 1)


def layer_input_rows(site: LayerSite, use: LayerUse, activation: np.ndarray) -> Iterator[torch.Tensor]:
    """Rows of X (one per token / position) for one use, as (groups, rows, in_per_group) chunks."""
    a = torch.from_numpy(np.ascontiguousarray(activation))
    if a.dtype not in (torch.float32, torch.float64):
        a = a.float()
    if site.op_type == "Conv":
        n = a.shape[0]
        per = max(int(a[0:1].numel() * math.prod(site.shape[2:])), 1)
        step = max(int(_ROW_CHUNK_FLOATS // per), 1)
        for s in range(0, n, step):
            yield _im2col(site, a[s : s + step])
        return
    if site.op_type == "Gemm":
        rows = a.t() if int(_node_attr(use.node, "transA", 0)) else a
    elif use.weight_position == 1:  # X @ W
        rows = a.reshape(-1, a.shape[-1])
    else:  # W @ X: X is (..., in, n)
        rows = (a.unsqueeze(-1) if a.dim() == 1 else a.transpose(-1, -2)).reshape(-1, site.shape[1])
    step = max(int(_ROW_CHUNK_FLOATS // max(rows.shape[1], 1)), 1)
    for s in range(0, rows.shape[0], step):
        yield rows[s : s + step].unsqueeze(0)


class LayerStats:
    """Running X^T X (per group, float64) - or only diag(X^T X) - and the row count of one layer."""

    def __init__(self, groups: int, cols: int, full: bool):
        self.full = full
        self.h = torch.zeros(groups, cols, cols, dtype=torch.float64) if full else None
        self.sq = torch.zeros(groups, cols, dtype=torch.float64)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.double()
        if self.h is not None:
            self.h += torch.bmm(x.transpose(1, 2), x)
        self.sq += (x * x).sum(dim=1)
        self.rows += int(x.shape[1])

    def hessian(self, group: int = 0) -> torch.Tensor:
        """H = 2 X^T X / n (SparseGPT's scale)."""
        assert self.h is not None
        return 2.0 * self.h[group] / max(self.rows, 1)


# ------------------------------------------------------------------------------------------------
# The two algorithms on one matrix
# ------------------------------------------------------------------------------------------------
def allocate_counts(total: int, sizes: list[int]) -> list[int]:
    """Split ``total`` over parts proportionally to ``sizes`` (largest remainder, exact sum)."""
    s = sum(sizes)
    if s == 0:
        return [0] * len(sizes)
    exact = [total * z / s for z in sizes]
    base = [min(int(math.floor(e)), z) for e, z in zip(exact, sizes)]
    rest = total - sum(base)
    order = sorted(range(len(sizes)), key=lambda i: (exact[i] - base[i]), reverse=True)
    for i in order:
        if rest <= 0:
            break
        if base[i] < sizes[i]:
            base[i] += 1
            rest -= 1
    return base


def _inverse_cholesky_upper(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper U with U^T U = (H + damp I)^-1, damp = percdamp * mean(diag H); grows on failure.

    Dead inputs (H_jj = 0) keep H_jj = 0, so after damping their weights cost w^2 * damp: they are
    pruned first (nearly free on the calibration data) and never move other weights. (SparseGPT sets
    H_jj = 1 and zeroes those weights; an absolute 1 can make dead inputs look MORE important than live
    ones when activations are small, and zeroing them would change the model off the calibration set.)
    """
    h = h.clone()
    diag = h.diagonal()
    mean = float(diag.clamp_min(0).mean())
    if not mean > 0:
        mean = 1.0
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    damp = max(percdamp * mean, 1e-10 * mean)
    for _ in range(8):
        chol, info = torch.linalg.cholesky_ex(h + damp * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            upper, info2 = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info2) == 0:
                return upper
        damp = damp * 10.0
        log.debug("SparseGPT: Cholesky failed, damping raised to %.3e", damp)
    raise UnsupportedModelError("SparseGPT: the layer Hessian could not be factorised")


def sparsegpt_prune_matrix(
    w: torch.Tensor,
    h: torch.Tensor,
    *,
    prune_count: int | None = None,
    nm: tuple[int, int] | None = None,
    alive: torch.Tensor | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one (rows, cols) matrix with Hessian ``h`` (cols x cols). Returns (W', keep mask).

    Unstructured: exactly ``prune_count`` entries end up pruned (at least the ones already dead in
    ``alive``); N:M: N pruned in every M consecutive columns of each row.
    """
    w = w.detach().clone().to(torch.float64)
    rows, cols = w.shape
    alive = torch.ones_like(w, dtype=torch.bool) if alive is None else alive.clone().bool()
    u = _inverse_cholesky_upper(h.to(torch.float64), percdamp)
    keep = alive.clone()
    if nm is not None:
        n_prune, m = nm
        bs = max(m, (blocksize // m) * m)
    else:
        if prune_count is None:
            raise ValueError("prune_count or nm is required")
        bs = blocksize
        total = int(prune_count)
        done = 0
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        c = i2 - i1
        w1 = w[:, i1:i2].clone()
        u1 = u[i1:i2, i1:i2]
        d1 = u1.diagonal()
        err1 = torch.zeros(rows, c, dtype=torch.float64)
        forced = ~alive[:, i1:i2]
        prune1 = torch.zeros(rows, c, dtype=torch.bool)
        if nm is None:
            target = int(round(total * i2 / cols))
            k = min(max(target - done, int(forced.sum())), rows * c)
            if k > 0:
                score = (w1**2 / d1**2).masked_fill(forced, float("-inf"))
                idx = torch.topk(score.reshape(-1), k, largest=False, sorted=False).indices
                prune1.view(-1)[idx] = True
            done += k
        for j in range(c):
            if nm is not None and j % m == 0:
                sc = (w1[:, j : j + m] ** 2 / d1[j : j + m] ** 2).masked_fill(forced[:, j : j + m], float("-inf"))
                idx = torch.topk(sc, n_prune, dim=1, largest=False).indices
                sel = torch.zeros_like(sc, dtype=torch.bool).scatter_(1, idx, True)
                prune1[:, j : j + m] = sel | forced[:, j : j + m]
            col = w1[:, j]
            q = torch.where(prune1[:, j], torch.zeros_like(col), col)
            err = (col - q) / u1[j, j]
            w1[:, j:] -= err[:, None] * u1[j, j:][None, :]
            err1[:, j] = err
        w1[prune1] = 0.0
        w[:, i1:i2] = w1
        keep[:, i1:i2] &= ~prune1
        if i2 < cols:
            w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return w, keep


def wanda_prune_matrix(
    w: torch.Tensor,
    col_sq_norm: torch.Tensor,
    *,
    prune_count: int | None = None,
    nm: tuple[int, int] | None = None,
    alive: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Wanda on one (rows, cols) matrix: score |W_ij| ||X_j||, per-row (or per N:M group) selection."""
    w = w.detach().clone().to(torch.float64)
    rows, cols = w.shape
    alive = torch.ones_like(w, dtype=torch.bool) if alive is None else alive.clone().bool()
    score = (w.abs() * col_sq_norm.to(torch.float64).clamp_min(0).sqrt()[None, :]).masked_fill(~alive, float("-inf"))
    if nm is not None:
        n_prune, m = nm
        groups = score.reshape(rows, cols // m, m)
        idx = torch.topk(groups, n_prune, dim=-1, largest=False).indices
        prune = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True).reshape(rows, cols)
    else:
        if prune_count is None:
            raise ValueError("prune_count or nm is required")
        per_row = torch.tensor(allocate_counts(int(prune_count), [cols] * rows), dtype=torch.long)
        per_row = torch.maximum(per_row, (~alive).sum(dim=1))
        order = torch.argsort(score, dim=1, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(cols).expand(rows, cols).contiguous())
        prune = rank < per_row[:, None]
    prune |= ~alive
    w[prune] = 0.0
    return w, alive & ~prune


# ------------------------------------------------------------------------------------------------
# Driver over a whole graph
# ------------------------------------------------------------------------------------------------
def _set_initializer(model: onnx.ModelProto, index: dict[str, int], name: str, arr: np.ndarray) -> None:
    model.graph.initializer[index[name]].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr), name))


def _layerwise(
    model: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    spec: SparsitySpec,
    *,
    method: str,
    names: list[str] | None = None,
    arrays: dict[str, np.ndarray] | None = None,
    masks: dict[str, np.ndarray] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    sequential: bool = True,
    chunk: int = 64,
    progress: ProgressFn | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Prune the named weights of ``model``; returns (pruned arrays, keep masks), both ONNX layout."""
    if method not in ("sparsegpt", "wanda"):
        raise InvalidOptionError(f"unknown layer-wise method {method!r}")
    work = densify_sparse_initializers(model)
    index = {t.name: i for i, t in enumerate(work.graph.initializer)}
    sites = find_layer_sites(work, names)
    current = {n: numpy_helper.to_array(work.graph.initializer[index[n]]) for n in sites}
    for n, arr in (arrays or {}).items():
        if n in sites:
            current[n] = np.asarray(arr, dtype=sites[n].dtype).reshape(sites[n].shape)
            _set_initializer(work, index, n, current[n])
    keep = {n: np.ones(sites[n].shape, dtype=bool) if masks is None or n not in masks else np.asarray(masks[n], bool)
            for n in sites}
    nm = spec.nm
    active = [n for n in sites if sites[n].supported]
    for n in sites:
        if not sites[n].supported:
            log.warning("%s: %d-D convolution %r is not supported and stays dense", method, len(sites[n].shape) - 2, n)
    if nm is not None:
        dense = [n for n in active if sites[n].to_matrix(current[n]).shape[1] % nm[1]]
        for n in dense:
            log.warning("%s: %r has %d input features, not a multiple of %d; left dense", method, n,
                        sites[n].to_matrix(current[n]).shape[1], nm[1])
        active = [n for n in active if n not in dense]
        counts = {n: 0 for n in active}
    else:
        if spec.scope == "global":
            log.info("%s: layer-wise method; the global target is met with uniform per-layer sparsity", method)
        if spec.steps > 1:
            log.info("%s: one-shot method, spec.steps=%d is not used", method, spec.steps)
        sizes = [int(np.prod(sites[n].shape)) for n in active]
        counts = dict(zip(active, allocate_counts(math.ceil(spec.sparsity * sum(sizes) - 1e-9), sizes)))
    waves = _waves(work, {n: sites[n] for n in active}, sequential)
    done = 0
    for wave in waves:
        values, types = [], {}
        for n in wave:
            for use in sites[n].uses:
                values.append(use.activation)
                types[use.activation] = sites[n].elem_type
        stats = {n: LayerStats(sites[n].groups, sites[n].to_matrix(current[n]).shape[1], full=method == "sparsegpt")
                 for n in wave}
        for acts in _iter_activations(work, feeds, values, types, chunk):
            for n in wave:
                for use in sites[n].uses:
                    for x in layer_input_rows(sites[n], use, acts[use.activation]):
                        stats[n].add(x)
        for n in wave:
            site = sites[n]
            mat = torch.from_numpy(np.array(site.to_matrix(current[n]), dtype=np.float64))
            alive = torch.from_numpy(np.array(site.to_matrix(keep[n]), dtype=bool))
            g = site.groups
            rows_per = mat.shape[0] // g
            group_counts = allocate_counts(counts[n], [rows_per * mat.shape[1]] * g) if nm is None else [0] * g
            new_w, new_keep = mat.clone(), alive.clone()
            for gi in range(g):
                r = slice(gi * rows_per, (gi + 1) * rows_per)
                if method == "sparsegpt":
                    wg, kg = sparsegpt_prune_matrix(mat[r], stats[n].hessian(gi), prune_count=group_counts[gi], nm=nm,
                                                    alive=alive[r], blocksize=blocksize, percdamp=percdamp)
                else:
                    wg, kg = wanda_prune_matrix(mat[r], stats[n].sq[gi], prune_count=group_counts[gi], nm=nm, alive=alive[r])
                new_w[r], new_keep[r] = wg, kg
            new_w = new_w * new_keep
            current[n] = site.from_matrix(new_w.numpy()).astype(site.dtype)
            keep[n] = site.from_matrix(new_keep.numpy())
            if sequential:
                _set_initializer(work, index, n, current[n])
            done += 1
            log.info("%s: %s pruned to %.4f (%d rows of input)", method, n, 1.0 - float(keep[n].mean()), stats[n].rows)
            if progress:
                progress(f"{method}: layer {done}/{len(active)} ({n})")
    return current, keep


def prune_arrays_and_masks(
    onnx_model: onnx.ModelProto,
    calib_inputs: dict[str, np.ndarray],
    spec: SparsitySpec,
    *,
    method: str = "sparsegpt",
    names: list[str] | None = None,
    num_samples: int | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    sequential: bool = True,
    chunk: int = 64,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """:func:`prune_arrays` that also returns the boolean keep masks (True = alive, ONNX layout)."""
    feeds = {k: np.asarray(v)[:num_samples] if num_samples else np.asarray(v) for k, v in calib_inputs.items()}
    return _layerwise(onnx_model, feeds, spec, method=method, names=names, blocksize=blocksize,
                      percdamp=percdamp, sequential=sequential, chunk=chunk)


def prune_arrays(
    onnx_model: onnx.ModelProto, calib_inputs: dict[str, np.ndarray], spec: SparsitySpec, **options: object
) -> dict[str, np.ndarray]:
    """Pruned initializer arrays (ONNX layout and dtype) of every Conv/Gemm/MatMul weight (or ``names``).

    Needs only onnxruntime: use it for graphs onnx2torch cannot convert. Write the result back with
    :func:`fls_compress.io.onnx_model.write_back`. ``calib_inputs`` is keyed by graph input name
    (extra keys such as labels are ignored); ``options`` are those of :func:`prune_arrays_and_masks`.
    """
    return prune_arrays_and_masks(onnx_model, calib_inputs, spec, **options)[0]  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# Pruners on a FisherProblem
# ------------------------------------------------------------------------------------------------
def _onnx_to_parameter(w: PrunableWeight, arr: np.ndarray, *, scaled: bool) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(arr))
    if w.transpose:
        t = t.t()
    t = t.reshape(w.parameter.shape)
    return t * w.scale if scaled and w.scale != 1.0 else t


class LayerwisePruner(Pruner):
    """Base of the activation-driven pruners; needs the ONNX model (``bind`` it or pass it)."""

    #: the registry factory cannot know the ONNX model; the caller must ``bind`` it
    needs_onnx_model = True
    method = ""

    def __init__(self, onnx_model: onnx.ModelProto | None = None, *, num_samples: int = 512,
                 sequential: bool = True, chunk: int = 64):
        self.onnx_model = onnx_model
        self.num_samples = int(num_samples)
        self.sequential = bool(sequential)
        self.chunk = int(chunk)
        self.name = self.method

    def bind(self, onnx_model: onnx.ModelProto) -> "LayerwisePruner":
        """Attach the original ONNX model (returns ``self``)."""
        self.onnx_model = onnx_model
        return self

    def _model(self) -> onnx.ModelProto:
        if self.onnx_model is None:
            raise InvalidOptionError(f"{self.name} needs the ONNX model: call bind(onnx_model) first")
        return self.onnx_model

    def _options(self) -> dict[str, object]:
        return {}

    def prune_arrays(self, calib_inputs: dict[str, np.ndarray], spec: SparsitySpec,
                     names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Torch-free pruning of the bound model; see :func:`prune_arrays`."""
        return prune_arrays(self._model(), calib_inputs, spec, method=self.method, names=names,
                            num_samples=self.num_samples, sequential=self.sequential, chunk=self.chunk,
                            **self._options())  # type: ignore[arg-type]

    def prune(self, problem: FisherProblem, spec: SparsitySpec, progress: ProgressFn | None = None) -> PruneResult:
        model = self._model()
        n = min(self.num_samples, problem.num_samples)
        feeds = {k: v[:n] for k, v in problem.inputs.items()}
        arrays = {name: w.to_onnx() for name, w in problem.weights.items()}
        masks = {name: w.to_onnx(problem.masks[name].to(torch.float64)) != 0 for name, w in problem.weights.items()}
        new_arrays, new_masks = _layerwise(model, feeds, spec, method=self.method, names=problem.names,
                                           arrays=arrays, masks=masks, sequential=self.sequential,
                                           chunk=self.chunk, progress=progress, **self._options())  # type: ignore[arg-type]
        with torch.no_grad():
            for name, w in problem.weights.items():
                keep = _onnx_to_parameter(w, new_masks[name], scaled=False).bool()
                problem.masks[name] = problem.masks[name] & keep
                value = _onnx_to_parameter(w, new_arrays[name].astype(np.float64), scaled=True)
                w.parameter.copy_(value.to(w.parameter.dtype))
        problem.apply_masks()
        result = PruneResult(self.name, problem.masks)
        result.steps.append(PruneStep(spec.sparsity, problem.sparsity()))
        result.info["num_samples"] = float(n)
        result.info["sequential"] = "yes" if self.sequential else "no"
        log.info("%s: sparsity %.4f (target %.4f)", self.name, problem.sparsity(), spec.sparsity)
        return result


class SparseGPTPruner(LayerwisePruner):
    """SparseGPT (Frantar & Alistarh, ICML 2023): OBS with H = 2 X^T X, Cholesky rows, lazy blocks."""

    method = "sparsegpt"

    def __init__(self, onnx_model: onnx.ModelProto | None = None, *, num_samples: int = 512,
                 blocksize: int = 128, percdamp: float = 0.01, sequential: bool = True, chunk: int = 64):
        super().__init__(onnx_model, num_samples=num_samples, sequential=sequential, chunk=chunk)
        if blocksize < 1 or not percdamp >= 0:
            raise InvalidOptionError("SparseGPT needs blocksize >= 1 and percdamp >= 0")
        self.blocksize = int(blocksize)
        self.percdamp = float(percdamp)

    def _options(self) -> dict[str, object]:
        return {"blocksize": self.blocksize, "percdamp": self.percdamp}


class WandaPruner(LayerwisePruner):
    """Wanda (Sun et al., ICLR 2024): score |W_ij| ||X_j||_2 per output row, no weight update."""

    method = "wanda"
