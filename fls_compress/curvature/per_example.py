"""Per-example weight gradients from layer hooks: one forward and one backward per batch.

For a layer y = x W^T (+ b) applied at positions t (sequence, pixels), the gradient of example n's
loss is G_n = sum_t g_nt x_nt^T with g = dL/dy (Goodfellow 2015, "Efficient per-example gradient
computations"; the same identity underlies K-FAC, Martens & Grosse 2015). A convolution is such a
layer on the unfolded (im2col) input; a MatMul with a constant right operand W ([in, out]) gives
G_n = sum_t x_nt g_nt^T, with a constant left operand W ([out, in]) G_n = sum_t g_nt x_nt^T.
Multiplying the batch-mean NLL by B makes g_n the gradient of example n's own loss.

Two checks guard against layouts the identity does not cover (a weight also used outside its layer,
an in-place op on a layer output): the per-example gradients must add up to the batch gradient, and
example 0's must equal its own backward pass. A layer whose input carries the batch on another axis
(attention projections exported on (seq, batch, d) rows) is re-checked with that axis moved first. Weights that fail
them, or whose layer has no rule (or merges the batch into other axes, e.g. attention projections on
(seq * batch, d) rows), are returned to the caller, which computes them with one backward per example.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .problem import Batch, FisherProblem

Record = tuple[str, nn.Module, torch.Tensor, torch.Tensor]  # kind, module, input, output


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str):
        return "conv2d"
    return None


def _is_matmul(module: nn.Module) -> bool:
    return type(module).__name__ == "OnnxMatMul"  # onnx2torch's MatMul: forward(x, y) = x @ y


def _layer_grad(kind: str, module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """(B, *weight shape) per-example gradients of one layer call from its input x and output grad g."""
    b = x.shape[0]
    if kind == "linear":
        return torch.bmm(g.reshape(b, -1, g.shape[-1]).transpose(1, 2), x.reshape(b, -1, x.shape[-1]))
    if kind == "conv2d":
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)
        return torch.bmm(g.reshape(b, g.shape[1], -1), cols.transpose(1, 2)).reshape(b, *module.weight.shape)
    if kind == "matmul_right":  # y = x @ W, W [in, out]
        return torch.bmm(x.reshape(b, -1, x.shape[-1]).transpose(1, 2), g.reshape(b, -1, g.shape[-1]))
    # y = W @ x, W [out, in], x [B, ..., in, N]
    xs = x.reshape(b, -1, x.shape[-2], x.shape[-1])
    gs = g.reshape(b, -1, g.shape[-2], g.shape[-1])
    return torch.einsum("bkon,bkin->boi", gs, xs)


def _layer_grad_total(kind: str, module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """sum_n G_n without materialising the per-example gradients where the layout allows."""
    if kind in ("linear", "matmul_right"):
        return _layer_grad(kind, module, x.reshape(1, -1, x.shape[-1]), g.reshape(1, -1, g.shape[-1]))[0]
    return _layer_grad(kind, module, x, g).sum(0)


class LazyGrads(Mapping):
    """name -> (B, *parameter shape), computed from the recorded layer calls on first access."""

    def __init__(self, problem: "FisherProblem", calls: dict[str, list[Record]], batch_size: int):
        self._problem = problem
        self._calls = calls
        self._batch_size = batch_size
        #: per-example gradients computed otherwise (one backward per example), name -> (B, *shape)
        self.fixed: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self.fixed:
            return self.fixed[name]
        parts = [_layer_grad(kind, m, x, g) for kind, m, x, g in self._calls[name]]
        if not parts:  # the weight does not reach the chosen output: its gradients are exactly zero
            p = self._problem.weights[name].parameter
            return torch.zeros((self._batch_size, *p.shape), dtype=p.dtype, device=p.device)
        return sum(parts[1:], parts[0]) * self._problem.masks[name]

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A, X) with G_n = A_n^T X_n in the (out, in) matrix view, A: (B, T, out), X: (B, T, in).

        Available for an unmasked weight used by a single hooked call; lets Kronecker moments use the
        T x T Gram matrices of the positions instead of forming every G_n. ``None`` otherwise.
        """
        calls = self._calls.get(name, [])
        if name in self.fixed or len(calls) != 1 or not bool(self._problem.masks[name].all()):
            return None
        kind, m, x, g = calls[0]
        b = x.shape[0]
        if kind in ("linear", "matmul_right"):
            return g.reshape(b, -1, g.shape[-1]), x.reshape(b, -1, x.shape[-1])
        if kind == "conv2d":
            cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
            return g.reshape(b, g.shape[1], -1).transpose(1, 2), cols.transpose(1, 2)
        # matmul_left: G = sum_{k, n} g_kn x_kn^T over the leading and last axes
        gs = g.reshape(b, -1, g.shape[-2], g.shape[-1]).transpose(-1, -2).reshape(b, -1, g.shape[-2])
        xs = x.reshape(b, -1, x.shape[-2], x.shape[-1]).transpose(-1, -2).reshape(b, -1, x.shape[-2])
        return gs, xs

    def __iter__(self) -> Iterator[str]:
        return iter(self._problem.names)

    def __len__(self) -> int:
        return len(self._problem.names)


def hooked_per_example_gradients(
    problem: "FisherProblem", batch: "Batch", target: torch.Tensor, *, rtol: float = 1e-4
) -> tuple[LazyGrads, dict[str, str]]:
    """Per-example gradients via hooks where they are exact; the rest as {name: reason} for a loop."""
    owner = {id(w.parameter): n for n, w in problem.weights.items()}
    module = problem.module
    assert module is not None
    records: list[tuple[str, str, nn.Module, torch.Tensor, torch.Tensor]] = []  # name, kind, module, x, y
    rest: dict[str, str] = {}
    handles = []
    for m in module.modules():
        weight = getattr(m, "weight", None)
        if id(weight) in owner:
            kind = _kind(m)
            if kind is None:
                rest[owner[id(weight)]] = f"no per-example rule for {type(m).__name__}"
                continue
            handles.append(m.register_forward_hook(
                lambda mod, inp, out, k=kind, n=owner[id(weight)]: records.append((n, k, mod, inp[0].detach(), out))))
        elif _is_matmul(m):
            def matmul_hook(mod, inp, out):
                x, y = inp[0], inp[1]
                if id(y) in owner and id(x) not in owner:
                    records.append((owner[id(y)], "matmul_right", mod, x.detach(), out))
                elif id(x) in owner and id(y) not in owner and y.dim() >= 3:
                    records.append((owner[id(x)], "matmul_left", mod, y.detach(), out))
                elif id(x) in owner or id(y) in owner:
                    rest[owner.get(id(x), owner.get(id(y)))] = "no per-example rule for this MatMul"

            handles.append(m.register_forward_hook(matmul_hook))
    try:
        out = problem.output(batch)
    finally:
        for h in handles:
            h.remove()
    for n in sorted(set(problem.names) - {r[0] for r in records}):
        rest.setdefault(n, "not used by a hookable layer")
    for r in records:
        if batch.size not in r[3].shape[: max(r[3].dim() - 1, 1)]:
            rest.setdefault(r[0], "its layer input has no axis of the batch's size")
    keep = [r for r in records if r[0] not in rest]
    calls: dict[str, list[Record]] = {n: [] for n in problem.names if n not in rest}
    result = LazyGrads(problem, calls, batch.size)
    if not keep:
        return result, rest
    loss = problem.likelihood.nll(out, target) * batch.size
    names = list(calls)
    params = [problem.weights[n].parameter for n in names]
    grads = torch.autograd.grad(loss, [r[4] for r in keep] + params, allow_unused=True)
    for (n, kind, m, x, _), g in zip(keep, grads[: len(keep)]):
        if g is not None:
            calls[n].append((kind, m, x, g.detach()))
    single = problem.likelihood.nll(problem.output(_first(batch)), target[:1])
    first = torch.autograd.grad(single, params, allow_unused=True)
    for n, p, g_sum, g_one in zip(names, params, grads[len(keep):], first):
        refs = [(torch.zeros_like(p) if ref is None else ref.detach()) * problem.masks[n] for ref in (g_sum, g_one)]
        leading = not calls[n] or calls[n][0][2].shape[0] == batch.size
        failure = _check(calls[n], refs, problem.masks[n], rtol) if leading else "batch axis"
        for axis in _other_batch_axes(calls[n], batch.size) if failure else ():
            moved = [(k, m, x.movedim(axis, 0), g.movedim(axis, 0)) for k, m, x, g in calls[n]]
            if _check(moved, refs, problem.masks[n], rtol) is None:
                calls[n], failure = moved, None  # e.g. attention projections on (seq, batch, d) inputs
                break
        if failure:
            rest[n] = f"hooked gradients do not {failure}" if failure != "batch axis" else "no batch axis of its layer input passes the checks"
            del calls[n]
    return result, rest


def _check(calls: list[Record], refs: list[torch.Tensor], mask: torch.Tensor, rtol: float) -> str | None:
    """``None`` if the hooked gradients add up to the batch gradient and example 0's equals its own, else what failed."""
    total = sum(_layer_grad_total(k, m, x, g) for k, m, x, g in calls)
    one = sum(_layer_grad(k, m, x[:1], g[:1])[0] for k, m, x, g in calls)
    for ref, got, what in zip(refs, (total, one), ("add up to the batch gradient", "match example 0's own gradient")):
        if float(((got - ref) * mask).abs().max()) > rtol * (float(ref.abs().max()) + 1e-30):
            return what
    return None


def _other_batch_axes(calls: list[Record], batch_size: int) -> list[int]:
    """Leading axes other than 0 of the batch's size in every call's input (linear / right MatMul only,
    where rows are independent positions, so moving the axis to the front keeps G_n = sum_t g_nt x_nt^T)."""
    if any(k not in ("linear", "matmul_right") for k, *_ in calls):
        return []
    dims = min(x.dim() for _, _, x, _ in calls)
    return [a for a in range(1, dims - 1) if all(x.shape[a] == batch_size and g.shape[a] == batch_size for _, _, x, g in calls)]


def _first(batch: "Batch") -> "Batch":
    from .problem import Batch

    return Batch({k: v[:1] for k, v in batch.inputs.items()}, None if batch.labels is None else batch.labels[:1])
