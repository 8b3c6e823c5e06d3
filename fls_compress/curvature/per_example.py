"""Per-example weight gradients from layer hooks: one forward and one backward per batch.

For a layer y = x W^T (+ b) applied at positions t (sequence, pixels), the gradient of example n's
loss is G_n = sum_t g_nt x_nt^T with g = dL/dy (Goodfellow 2015, "Efficient per-example gradient
computations"; the same identity underlies K-FAC, Martens & Grosse 2015). A convolution is such a
layer on the unfolded (im2col) input. Multiplying the batch-mean NLL by B makes g_n the gradient of
example n's own loss. The result is checked against the batch gradient from the same backward pass;
any mismatch (a weight also used outside the hooked layers, an in-place op on a layer output) makes
the caller fall back to one backward per example.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .problem import Batch, FisherProblem


def _hookable(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)
    return False


def _layer_grad(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """(B, *weight shape) per-example gradients of one layer call from its input x and output grad g."""
    b = x.shape[0]
    if isinstance(module, nn.Linear):
        xs = x.reshape(b, -1, x.shape[-1])
        gs = g.reshape(b, -1, g.shape[-1])
        return torch.bmm(gs.transpose(1, 2), xs)
    cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)
    gs = g.reshape(b, g.shape[1], -1)
    return torch.bmm(gs, cols.transpose(1, 2)).reshape(b, *module.weight.shape)


class LazyGrads(Mapping):
    """name -> (B, *parameter shape), computed from the recorded layer calls on first access."""

    def __init__(self, problem: "FisherProblem", calls: dict[str, list[tuple[nn.Module, torch.Tensor, torch.Tensor]]]):
        self._problem = problem
        self._calls = calls

    def __getitem__(self, name: str) -> torch.Tensor:
        total = None
        for module, x, g in self._calls[name]:
            part = _layer_grad(module, x, g)
            total = part if total is None else total + part
        return total * self._problem.masks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._problem.names)

    def __len__(self) -> int:
        return len(self._problem.names)


def hooked_per_example_gradients(
    problem: "FisherProblem", batch: "Batch", target: torch.Tensor, *, rtol: float = 1e-4
) -> tuple[LazyGrads | None, str]:
    """Per-example gradients via hooks, or (None, reason) when the hooks cannot give them exactly."""
    owner = {id(w.parameter): n for n, w in problem.weights.items()}
    layers = [m for m in problem.module.modules() if id(getattr(m, "weight", None)) in owner]  # type: ignore[union-attr]
    unhookable = sorted({owner[id(m.weight)] for m in layers if not _hookable(m)})
    if unhookable:
        return None, f"weights in layers without a per-example rule: {', '.join(unhookable[:3])}"
    covered = {owner[id(m.weight)] for m in layers}
    missing = [n for n in problem.names if n not in covered]
    if missing:
        return None, f"weights not held by nn.Linear/nn.Conv2d layers: {', '.join(missing[:3])}"
    records: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        records.append((module, inputs[0].detach(), output))

    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        out = problem.output(batch)
    finally:
        for h in handles:
            h.remove()
    loss = problem.likelihood.nll(out, target) * batch.size
    outs = [y for _, _, y in records]
    grads = torch.autograd.grad(loss, outs + problem.params, allow_unused=True)
    calls: dict[str, list] = {n: [] for n in problem.names}
    for (module, x, _), g in zip(records, grads[: len(outs)]):
        if g is not None:
            calls[owner[id(module.weight)]].append((module, x, g.detach()))
    result = LazyGrads(problem, calls)
    # exactness check: the per-example gradients must add up to the batch gradient
    for n, p, g in zip(problem.names, problem.params, grads[len(outs):]):
        full = (torch.zeros_like(p) if g is None else g.detach()) * problem.masks[n]
        summed = sum((_layer_grad(m, x, gy).sum(0) for m, x, gy in calls[n]), torch.zeros_like(p)) * problem.masks[n]
        scale = float(full.abs().max()) + 1e-30
        if float((summed - full).abs().max()) > rtol * scale:
            return None, f"hooked gradients of {n} do not add up to the batch gradient (weight used outside its layer?)"
    return result, ""
