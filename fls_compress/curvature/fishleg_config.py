"""Settings of the FishLeg inverse-Fisher fit (:class:`FishLegConfig`); the user-facing knobs are
:class:`fls_compress.configs.FLSConfig`, translated by :func:`fls_compress.pruning.registry.fishleg_config`."""

from __future__ import annotations

from dataclasses import dataclass

from ..configs import FLSConfig  # the user-facing defaults live there, once
from ..errors import InvalidOptionError

UPDATES = ("auto", "sweep", "row-exact", "decoupled", "block-exact")
FORMS = ("kron", "ekfac", "block")


@dataclass
class FishLegConfig:
    """Hyper-parameters of the FishLeg inverse-Fisher fit.

    damping: absolute gamma on the per-example NLL scale, or ``None`` for ``relative_damping`` times the
        mean diagonal Fisher of the prunable weights (measured at fit time).
    update: group OBS update, see the module docstring. ``row_exact_max_in``: widest layer (inputs)
        the row-exact update accepts (it costs one dense in x in solve per output row).
    sweep_block: lazy-batch block size of the column sweep. probes: probes per Fisher product.
    fast_matmul: the fit's float32 matmuls may use the backend's reduced-precision internal arithmetic
        (:func:`fls_compress.runtime.fast_matmul`: oneDNN bf16 on CPUs with AVX512-BF16/AMX, TF32 on CUDA);
        with oneDNN bf16 the Kronecker groups' products of the auxiliary steps run on bf16 copies of the
        probes and factors (:meth:`FishLegEstimator._product_dtype`; rounding bounded entrywise by
        :func:`~fls_compress.curvature.qforms.kron_rounding_bound`). Only the auxiliary steps run so; the validation
        checkpoints that accept lambda, Adam's state, Q's start and every product used for pruning stay float32.
    fit_seconds: optional wall-clock budget of each fit/refit; the step loop stops once it is spent
        (recorded in ``FitStats.extra["stopped_after_steps"]``); ``None`` = run all steps.
    lr / fit_steps / refit_steps: see :class:`fls_compress.configs.pruning.FishLegFit` (fit steps from Q's
        error curve in ``benchmarks/fishleg_convergence.py``; lr and refit steps from the pruned autoencoder's
        validation loss in ``benchmarks/fls_prune_time.py``). ``None`` (default): those step counts, scaled
        down above 3M prunable weights (:func:`fls_compress.configs.pruning.auto_steps`).
    refit_mode: ``"warm"`` continues the fit from the current lambda between pruning steps; ``"restart"``
        rebuilds the start from the masked model's gradients first.
    """

    form: str = "kron"  # "kron" | "ekfac" | "block"
    block_size: int = 50
    damping: float | None = None
    relative_damping: float = 0.1
    init: str = "kfac"  # "kfac" | "diag" | "identity"
    fit_steps: int | None = None  # None: auto_steps(DEFAULT_FIT_STEPS, prunable weights, DEFAULT_FIT_STEPS // 2)
    refit_steps: int | None = None  # None: auto_steps(DEFAULT_REFIT_STEPS, prunable weights, DEFAULT_REFIT_STEPS // 2)
    refit_mode: str = "warm"  # "warm" (continue from the current lambda) | "restart" (re-estimate the start, then fit)
    aux_batch: int = FLSConfig.default_of("batch_size")
    lr: float = FLSConfig.default_of("aux_lr")
    final_lr_fraction: float = 0.1
    precondition: bool = True
    fast_matmul: bool = True
    update: str = "auto"  # "auto" | "sweep" | "row-exact" | "decoupled" | "block-exact" (block form)
    row_exact_max_in: int = 2048
    sweep_block: int = 128
    probes: int = FLSConfig.default_of("probes")
    fit_seconds: float | None = None
    diag_samples: int = FLSConfig.default_of("moment_samples")
    clamp: float = 1e-12

    def validate(self) -> None:
        if self.form not in FORMS:
            raise InvalidOptionError(f"FishLeg form must be one of {', '.join(FORMS)}, got {self.form!r}")
        if self.init not in ("diag", "identity", "kfac"):
            raise InvalidOptionError(f"FishLeg init must be 'kfac', 'diag' or 'identity', got {self.init!r}")
        if self.damping is not None and not self.damping > 0:
            raise InvalidOptionError(f"damping must be > 0, got {self.damping}")
        if not self.relative_damping > 0:
            raise InvalidOptionError(f"relative damping must be > 0, got {self.relative_damping}")
        if (self.fit_steps or 0) < 0 or (self.refit_steps or 0) < 0 or self.aux_batch < 1 or self.block_size < 1:
            raise InvalidOptionError("FishLeg steps must be >= 0, aux batch and block size >= 1")
        if self.probes < 1 or self.sweep_block < 1 or self.row_exact_max_in < 1:
            raise InvalidOptionError("FishLeg probes, sweep block and row-exact limit must be >= 1")
        if self.fit_seconds is not None and not self.fit_seconds > 0:
            raise InvalidOptionError(f"FishLeg fit time budget must be > 0 seconds, got {self.fit_seconds}")
        if self.refit_mode not in ("warm", "restart"):
            raise InvalidOptionError(f"FishLeg refit must be 'warm' or 'restart', got {self.refit_mode!r}")
        if self.update not in UPDATES:
            raise InvalidOptionError(f"FishLeg update must be one of {', '.join(UPDATES)}, got {self.update!r}")
        if self.form != "block" and self.update == "block-exact":
            raise InvalidOptionError("the block-exact update needs the block form (--q-form block)")
