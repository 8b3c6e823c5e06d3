"""The object every curvature estimator works on: a model, its prunable weights, data and a likelihood.

:class:`FisherProblem` hides the ONNX/torch plumbing from the estimators. It provides

* a deterministic, persistent cycling sampler over calibration batches (rebuilding
  iterators per step would restart the data order and bias the stochastic auxiliary loss),
* the sampled-label loss (labels drawn once per batch from the model itself),
* exact Fisher-vector products F v = E[J^T H_out J] v computed with two reverse-mode passes
  (the "double-vjp" trick for J v) - exact for canonical-link likelihoods, with no label noise
  and no finite-difference round-off (the GGN product of
  Schraudolph 2002, as used by FishLeg, Garcia et al. 2023),
* per-example gradients with sampled or true labels (for empirical/diagonal Fisher estimators), from
  one backward per batch when layer hooks cover every prunable weight (see :mod:`.per_example`),
* explicit boolean masks (True = weight alive) keyed by ONNX initializer name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping

import numpy as np
import torch

from ..bridge.weights import PrunableWeight
from .likelihoods import Likelihood
from .per_example import hooked_per_example_gradients

log = logging.getLogger(__name__)

#: Per-example gradients materialised at once are limited to about this many floats.
PER_EXAMPLE_BUDGET = 1 << 25

Forward = Callable[[dict[str, torch.Tensor]], list[torch.Tensor]]


@dataclass
class Batch:
    """One calibration batch: model inputs (torch) and optional true labels."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    def examples(self) -> Iterator["Batch"]:
        """The batch split into batches of one example (for per-example quantities)."""
        for i in range(self.size):
            yield Batch(
                {k: v[i : i + 1] for k, v in self.inputs.items()},
                None if self.labels is None else self.labels[i : i + 1],
            )


@dataclass
class FisherProblem:
    """Model + prunable weights + calibration data + likelihood, with Fisher products.

    Parameters
    ----------
    forward:
        Callable mapping a dict of input tensors to the list of model outputs.
    weights:
        Prunable weights keyed by ONNX initializer name (their ``parameter`` tensors are updated in place).
    inputs / labels:
        Calibration arrays (numpy) with a leading sample axis; ``labels`` is optional.
    likelihood:
        Output likelihood that defines the Fisher.
    output_index:
        Which model output the likelihood applies to.
    batch_size:
        Batch size used by :meth:`next_batch`.
    targets_from_input:
        For reconstruction models (autoencoders) the "true label" is the input itself; names the input.
    module:
        The torch module that ``forward`` runs, if any. With it, per-example gradients of weights held by
        ``nn.Linear``/``nn.Conv2d`` submodules come from layer hooks in one backward per batch.
    max_batch:
        Most samples the model takes per call (1 for graphs with batch-1 state inputs, e.g. recurrent
        ``h``/``c`` of shape [1, 1, H]); larger batches are run as chunks and their outputs concatenated
        (the autograd graph spans the chunks, so every Fisher product stays exact).
    """

    forward: Forward
    weights: dict[str, PrunableWeight]
    inputs: dict[str, np.ndarray]
    likelihood: Likelihood
    labels: np.ndarray | None = None
    output_index: int = 0
    batch_size: int = 64
    seed: int = 0
    targets_from_input: str | None = None
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    module: torch.nn.Module | None = None
    max_batch: int | None = None

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)
        self._rng = np.random.default_rng(self.seed)
        self._order: np.ndarray = np.empty(0, dtype=np.int64)
        self._cursor = 0
        for name, w in self.weights.items():
            self.masks.setdefault(name, torch.ones_like(w.parameter, dtype=torch.bool))
        #: how per-example gradients were computed last ("hooks" or "loop") and why the loop was used
        self.per_example_info: dict[str, str] = {}

    # ---------------------------------------------------------------- data
    @property
    def num_samples(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    def batch_from_indices(self, idx: np.ndarray) -> Batch:
        device = self.params[0].device if self.weights else torch.device("cpu")
        inputs = {k: torch.from_numpy(np.ascontiguousarray(v[idx])).to(device) for k, v in self.inputs.items()}
        labels = None
        if self.labels is not None:
            labels = torch.from_numpy(np.ascontiguousarray(self.labels[idx])).to(device)
        elif self.targets_from_input is not None:
            labels = inputs[self.targets_from_input]
        return Batch(inputs, labels)

    def next_batch(self, batch_size: int | None = None) -> Batch:
        """Next batch of a persistent, seeded, reshuffled-per-epoch cycle over the calibration set."""
        bs = min(batch_size or self.batch_size, self.num_samples)
        if self._cursor + bs > len(self._order):
            self._order = self._rng.permutation(self.num_samples)
            self._cursor = 0
        idx = self._order[self._cursor : self._cursor + bs]
        self._cursor += bs
        return self.batch_from_indices(idx)

    def iter_batches(self, num_samples: int | None = None, batch_size: int | None = None) -> Iterator[Batch]:
        """Sequential (unshuffled) pass over the first ``num_samples`` samples."""
        n = min(num_samples or self.num_samples, self.num_samples)
        bs = batch_size or self.batch_size
        for start in range(0, n, bs):
            yield self.batch_from_indices(np.arange(start, min(start + bs, n)))

    # ---------------------------------------------------------------- model
    @property
    def names(self) -> list[str]:
        return list(self.weights)

    @property
    def num_weights(self) -> int:
        """Prunable weights in total (masked ones included)."""
        return sum(w.numel for w in self.weights.values())

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [w.parameter for w in self.weights.values()]

    def output(self, batch: Batch) -> torch.Tensor:
        step = self.max_batch
        if step is None or batch.size <= step:
            return self.forward(batch.inputs)[self.output_index]
        parts = [self.forward({k: v[i : i + step] for k, v in batch.inputs.items()})[self.output_index]
                 for i in range(0, batch.size, step)]
        return torch.cat(parts, 0)

    def target(self, out: torch.Tensor, batch: Batch, labels: str = "sampled") -> torch.Tensor:
        """Labels ``"sampled"`` from the model's predictive distribution, or the ``"true"`` ones."""
        if labels == "sampled":
            # drawn on the CPU with the problem's generator: the same labels on every device
            return self.likelihood.sample(out.detach().cpu(), self.generator).to(out.device)
        if batch.labels is None:
            raise ValueError("true labels requested but the calibration data has none")
        return batch.labels

    def loss(self, batch: Batch, *, labels: str = "sampled") -> torch.Tensor:
        """Mean NLL on ``batch`` with labels ``"sampled"`` from the model or ``"true"`` labels."""
        out = self.output(batch)
        return self.likelihood.nll(out, self.target(out, batch, labels))

    def gradient(self, batch: Batch, *, labels: str = "sampled") -> dict[str, torch.Tensor]:
        """Batch-mean gradient of the NLL with respect to each prunable weight (masked)."""
        loss = self.loss(batch, labels=labels)
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        return {
            n: (torch.zeros_like(p) if g is None else g) * self.masks[n]
            for (n, p), g in zip(((n, w.parameter) for n, w in self.weights.items()), grads)
        }

    def per_example_gradient_batch(self, batch: Batch, *, labels: str = "sampled") -> Mapping[str, torch.Tensor]:
        """Per-example NLL gradients, name -> (B, *parameter shape), masked.

        Labels are drawn once for the whole batch (from the model's predictive distribution, or the
        true ones). With ``module`` set, one forward and one backward give those of every weight held by
        a hookable layer (G_n = g_n^T x_n summed over positions; checked, see :mod:`.per_example`),
        computed lazily one layer per access; the other weights (all of them without ``module``) take
        one backward per example (logged; ``per_example_info`` says which and why).
        """
        with torch.no_grad():
            out = self.output(batch)
        target = self.target(out, batch, labels)
        if self.module is None:
            grads, rest = None, {n: "no torch module given to the FisherProblem" for n in self.names}
        elif self.max_batch is not None and batch.size > self.max_batch:  # hooks need one forward for the batch
            grads, rest = None, {n: f"the model takes at most {self.max_batch} sample(s) per call" for n in self.names}
        else:
            grads, rest = hooked_per_example_gradients(self, batch, target)
        mode = "hooks" if not rest else ("loop" if len(rest) == len(self.names) else "hooks+loop")
        info = {"per_example": mode}
        if rest:
            reasons = sorted({f"{why} ({n})" for n, why in rest.items()})
            info["per_example_reason"] = "; ".join(reasons[:3]) + (f"; and {len(reasons) - 3} more" if len(reasons) > 3 else "")
            if self.per_example_info.get("per_example") != mode:
                log.warning("per-example gradients: one backward per example for %d of %d weights: %s",
                            len(rest), len(self.names), info["per_example_reason"])
        self.per_example_info = info
        if not rest:
            return grads  # type: ignore[return-value]
        names = [n for n in self.names if n in rest]
        params = [self.weights[n].parameter for n in names]
        rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        for i, sub in enumerate(batch.examples()):
            loss = self.likelihood.nll(self.output(sub), target[i : i + 1])
            for n, p, g in zip(names, params, torch.autograd.grad(loss, params, allow_unused=True)):
                rows[n].append((torch.zeros_like(p) if g is None else g.detach()) * self.masks[n])
        looped = {n: torch.stack(r) for n, r in rows.items()}
        if grads is None:
            return looped
        grads.fixed.update(looped)
        return grads

    def per_example_gradients(
        self, batch: Batch, *, labels: str = "sampled"
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Yield one gradient dict per example (see :meth:`per_example_gradient_batch`).

        The batch is processed in chunks so that at most ~``PER_EXAMPLE_BUDGET`` floats are alive.
        """
        total = self.num_weights
        chunk = max(1, min(batch.size, PER_EXAMPLE_BUDGET // max(total, 1)))
        for start in range(0, batch.size, chunk):
            stop = min(start + chunk, batch.size)
            sub = Batch(
                {k: v[start:stop] for k, v in batch.inputs.items()},
                None if batch.labels is None else batch.labels[start:stop],
            )
            grads = dict(self.per_example_gradient_batch(sub, labels=labels))
            for i in range(stop - start):
                yield {n: g[i] for n, g in grads.items()}

    def fisher_vp(self, batch: Batch, vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Exact Fisher (GGN) vector product F v = (1/B) sum_n J_n^T H_n J_n v over ``batch``."""
        return self.fisher_vps(batch, [vectors])[0]

    def fisher_vps(self, batch: Batch, vectors: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """F v for several vectors v sharing one forward pass (GGN products, Schraudolph 2002).

        J v is obtained without forward-mode AD: g(w) = J^T w is linear in a dummy cotangent w, so
        J v = d<g(w), v>/dw. Then J^T (H_out J v) is one more vector-Jacobian product. The results are
        masked (only surviving weights carry curvature).
        """
        params = self.params
        out = self.output(batch)
        dummy = torch.zeros_like(out, requires_grad=True)
        jt_dummy = torch.autograd.grad(out, params, grad_outputs=dummy, create_graph=True, allow_unused=True)
        results = []
        for vecs in vectors:
            pairs = [(g, vecs[n]) for g, n in zip(jt_dummy, self.names) if g is not None]
            jv = torch.autograd.grad([g for g, _ in pairs], dummy, grad_outputs=[v for _, v in pairs], retain_graph=True)[0]
            hjv = self.likelihood.output_hvp(out, jv.detach())
            fv = torch.autograd.grad(out, params, grad_outputs=hjv, allow_unused=True, retain_graph=True)
            results.append({
                n: (torch.zeros_like(p) if g is None else g) * self.masks[n]
                for n, p, g in zip(self.names, params, fv)
            })
        return results

    def dense_fisher(self, names: list[str] | None = None, num_samples: int | None = None) -> torch.Tensor:
        """Exact Fisher restricted to the listed weights (small models only; used by tests/benchmarks)."""
        names = names or self.names
        sizes = [self.weights[n].numel for n in names]
        total = sum(sizes)
        device = self.params[0].device
        fisher = torch.zeros(total, total, dtype=torch.float64, device=device)
        batches = list(self.iter_batches(num_samples))
        count = sum(b.size for b in batches)
        for batch in batches:
            for col in range(total):
                e = torch.zeros(total, dtype=self.params[0].dtype, device=device)
                e[col] = 1.0
                vec, off = {}, 0
                for n in self.names:
                    if n in names:
                        sz = self.weights[n].numel
                        vec[n] = e[off : off + sz].reshape(self.weights[n].parameter.shape)
                        off += sz
                    else:
                        vec[n] = torch.zeros_like(self.weights[n].parameter)
                fv = self.fisher_vp(batch, vec)
                fisher[:, col] += torch.cat([fv[n].reshape(-1) for n in names]).double() * batch.size
        return fisher / count

    # ---------------------------------------------------------------- masks
    def apply_masks(self) -> None:
        """Hard-zero every pruned weight (explicit masks; never infer masks from values)."""
        with torch.no_grad():
            for n, w in self.weights.items():
                w.parameter.mul_(self.masks[n])

    def sparsity(self) -> float:
        total = sum(m.numel() for m in self.masks.values())
        alive = sum(int(m.sum()) for m in self.masks.values())
        return 1.0 - alive / max(total, 1)


def problem_from_module(
    module: torch.nn.Module,
    inputs: np.ndarray,
    likelihood: Likelihood,
    *,
    labels: np.ndarray | None = None,
    batch_size: int = 64,
    seed: int = 0,
    max_batch: int | None = None,
) -> FisherProblem:
    """A FisherProblem over every ``nn.Linear``/``nn.Conv2d`` weight of a plain torch module.

    For models that are already in PyTorch (benchmarks, tests): no ONNX conversion involved. Weights are
    keyed ``"<module path>.weight"``; biases and all other parameters are frozen.
    """
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    weights: dict[str, PrunableWeight] = {}
    for path, sub in module.named_modules():
        if isinstance(sub, (torch.nn.Linear, torch.nn.Conv2d)):
            sub.weight.requires_grad_(True)
            name = f"{path}.weight"
            op = "Gemm" if isinstance(sub, torch.nn.Linear) else "Conv"
            weights[name] = PrunableWeight(name, op, sub.weight, tuple(sub.weight.shape))
    return FisherProblem(
        forward=lambda feeds: [module(feeds["x"])],
        weights=weights,
        inputs={"x": inputs},
        likelihood=likelihood,
        labels=labels,
        batch_size=batch_size,
        seed=seed,
        module=module,
        max_batch=max_batch,
    )
