"""Baseline pruning methods, registered into :data:`registry.METHODS` on import.

=================  ==========================================================================  ===================
key                method                                                                      paper
=================  ==========================================================================  ===================
``obert``          OBS with the block-50 empirical-Fisher inverse (Woodbury), true labels      Kurtic et al. 2022 (oBERT); Singh & Alistarh 2020 (WoodFisher)
``ief``            the same with improved-empirical-Fisher vectors g / ||dl/dz|| ("iEF surgeon") Wu et al. 2024 (iEF), team memo 7.8
``mfac``           OBS with the matrix-free (M-FAC static) inverse EF, joint over all weights  Frantar et al. 2021 (M-FAC)
``sparsegpt``      layer-wise OBS from captured layer inputs, Cholesky sweep, lazy blocks      Frantar & Alistarh 2023
``wanda``          |W| * ||X_j|| per output row, no update                                     Sun et al. 2024
``magnitude-layer`` magnitude with every layer pruned to the same sparsity                     Han et al. 2015
=================  ==========================================================================  ===================

Every factory takes :class:`~fls_compress.pruning.registry.MethodOptions`:

* ``obert`` / ``ief`` / ``mfac`` read ``num_grads`` (m), ``block_size`` (oBERT/iEF B), ``damping``
  (absolute lambda, or ``None`` for ``relative_damping`` x mean diag of the estimate);
* ``sparsegpt`` / ``wanda`` read ``num_samples`` (calibration samples to capture).

Wiring the layer-wise methods (for the lead): they work from activations captured with onnxruntime
and therefore need the original ONNX model, which a factory cannot know. Their pruners carry
``needs_onnx_model = True`` and a ``bind(onnx_model) -> pruner`` method::

    pruner = make_pruner(method, opts)
    if getattr(pruner, "needs_onnx_model", False):
        pruner.bind(original_onnx_model)          # before pruner.prune(problem, spec)

For graphs onnx2torch cannot convert, ``pruner.prune_arrays(calib_inputs, spec)``
(:meth:`~fls_compress.pruning.layerwise.LayerwisePruner.prune_arrays`) returns the pruned initializer arrays in ONNX
layout without any torch model; write them back with :func:`fls_compress.io.onnx_model.write_back`.

``magnitude-layer`` is :class:`MagnitudePruner` with the spec's scope forced to ``"layer"``
(``magnitude`` with ``--scope layer`` is the same thing).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..curvature.empirical_fisher import BlockWoodburyEstimator
from ..curvature.mfac import MFACEstimator
from ..curvature.problem import FisherProblem
from . import registry
from .base import ProgressFn, PruneResult, PruneStep, Pruner, SparsitySpec
from .magnitude import MagnitudePruner
from .obs import OBSPruner
from .registry import MethodOptions
from .selection import allocate_counts, select_global
from .sparsegpt import SparseGPTPruner
from .wanda import WandaPruner


class LayerMagnitudePruner(MagnitudePruner):
    """Magnitude pruning with uniform per-layer sparsity whatever the spec's scope.

    Every layer gets the target fraction up to one weight; the per-layer counts are split by largest
    remainder so that the overall count is exactly ceil(s * total) (as ``select_global``) (per-layer rounding alone can miss
    it by up to half a weight per layer). N:M specs are delegated to :class:`MagnitudePruner`.
    """

    name = "magnitude-layer"

    def prune(self, problem: FisherProblem, spec: SparsitySpec, progress: ProgressFn | None = None) -> PruneResult:
        if spec.nm is not None:
            result = super().prune(problem, dataclasses.replace(spec, scope="layer"), progress)
            result.method = self.name
            return result
        result = PruneResult(self.name, problem.masks)
        for target in spec.schedule():
            sizes = [problem.masks[n].numel() for n in problem.names]
            counts = allocate_counts(math.ceil(target * sum(sizes) - 1e-9), sizes)
            for n, k, size in zip(problem.names, counts, sizes):
                mask = problem.masks[n]
                score = torch.where(mask, problem.weights[n].parameter.detach().abs(), torch.full_like(mask, float("inf"), dtype=problem.weights[n].parameter.dtype))
                newly = select_global({n: score}, {n: mask}, k / size)[n]
                problem.masks[n] = mask & ~newly
            problem.apply_masks()
            result.steps.append(PruneStep(target, problem.sparsity()))
            if progress:
                progress(f"{self.name}: sparsity {problem.sparsity():.3f}")
        return result


def _obert(opts: MethodOptions) -> Pruner:
    return OBSPruner(BlockWoodburyEstimator(opts.num_grads, opts.block_size, opts.damping, opts.relative_damping))


def _ief(opts: MethodOptions) -> Pruner:
    return OBSPruner(
        BlockWoodburyEstimator(opts.num_grads, opts.block_size, opts.damping, opts.relative_damping, ief=True)
    )


def _mfac(opts: MethodOptions) -> Pruner:
    return OBSPruner(MFACEstimator(opts.num_grads, opts.damping, opts.relative_damping))


def _sparsegpt(opts: MethodOptions) -> Pruner:
    return SparseGPTPruner(num_samples=opts.num_samples)


def _wanda(opts: MethodOptions) -> Pruner:
    return WandaPruner(num_samples=opts.num_samples)


def _magnitude_layer(opts: MethodOptions) -> Pruner:
    return LayerMagnitudePruner()


registry.METHODS.update(
    {
        "obert": _obert,
        "ief": _ief,
        "mfac": _mfac,
        "sparsegpt": _sparsegpt,
        "wanda": _wanda,
        "magnitude-layer": _magnitude_layer,
    }
)
