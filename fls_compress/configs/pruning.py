"""One frozen config per pruning method; each holds only the knobs its handler reads.

Class hierarchy (a field is declared once, on the class that introduces it):

* :class:`PruneConfig` - the target every method reaches: ``sparsity`` or an N:M ``pattern``, ``exclude``.
* :class:`GlobalScope` - methods that rank weights with one score across layers can choose ``scope``.
* :class:`CurvatureConfig` - OBS methods driven by an inverse-Fisher estimate of a likelihood on the
  model's output (needs the torch graph): sub-``steps``, ``likelihood``, ``output_name``, damping.
* concrete configs: :class:`FLSConfig`, :class:`OBertConfig`, :class:`IEFConfig`, :class:`MFACConfig`,
  :class:`SparseGPTConfig`, :class:`WandaConfig`, :class:`MagnitudeConfig`.

``needs`` declares what a handler consumes: ``"torch"`` (an onnx2torch graph for gradients and Fisher
products), ``"activations"`` (layer inputs captured with onnxruntime), or nothing (weights alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import InvalidOptionError
from .base import Config, knob
from .recovery import Recovery

TORCH = "torch"
#: Default cap on the activation rows of X per layer (all samples and uses together; a seeded uniform
#: subsample above it, fls_compress.io.layer_rows.RowStatistics); only large feature maps reach it.
DEFAULT_MAX_ROWS = 65536
ACTIVATIONS = "activations"

LIKELIHOODS = ("auto", "categorical", "bernoulli", "gaussian")


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """Parse ``"N:M"`` (``"2:4"``: 2 zeros in every 4 consecutive weights along the reduction axis)."""
    if pattern is None or pattern == "":
        return None
    try:
        n_str, m_str = pattern.split(":")
        n, m = int(n_str), int(m_str)
    except ValueError:
        raise InvalidOptionError(f"--pattern must look like N:M (e.g. 2:4), got {pattern!r}") from None
    if not 0 < n < m:
        raise InvalidOptionError(f"--pattern N:M needs 0 < N < M, got {pattern!r}")
    return n, m


@dataclass(frozen=True)
class MethodConfig(Config):
    """A compression method's config; ``method`` names it in job specs and the CLI."""

    method: ClassVar[str] = ""
    command: ClassVar[str] = "prune"
    needs: ClassVar[frozenset[str]] = frozenset()
    summary: ClassVar[str] = ""

    def to_dict(self) -> dict:
        return {"method": self.method, **super().to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> "MethodConfig":
        data = dict(data)
        name = data.pop("method", cls.method)
        if name != cls.method:
            raise InvalidOptionError(f"config for method {name!r} given to {cls.__name__}")
        return super().from_dict(data)  # type: ignore[return-value]


DEFAULT_SPARSITY = 0.5


@dataclass(frozen=True)
class PruneConfig(MethodConfig):
    panel: ClassVar[str] = "Pruning target"

    sparsity: float | None = knob(
        None, f"Target fraction of zeros in the prunable weights, in [0, 1) (default {DEFAULT_SPARSITY}; N/M with --pattern).",
        min=0.0, max=1.0, max_open=True, short="-s",
    )
    pattern: str | None = knob(None, "Semi-structured N:M sparsity, e.g. 2:4 (N zeros in every M weights along the input channels).")
    exclude: tuple[str, ...] = knob((), "Glob of weight names to keep dense (repeatable).")

    def validate(self) -> None:
        super().validate()
        nm = parse_pattern(self.pattern)
        if nm is not None and self.sparsity is not None:
            raise InvalidOptionError("give --sparsity or --pattern, not both (an N:M pattern fixes the sparsity at N/M)")

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    @property
    def target(self) -> float:
        """The overall sparsity this config reaches."""
        nm = self.nm
        if nm is not None:
            return nm[0] / nm[1]
        return DEFAULT_SPARSITY if self.sparsity is None else float(self.sparsity)


@dataclass(frozen=True)
class GlobalScope(PruneConfig):
    scope: str = knob("global", "global: rank all layers together; layer: the same sparsity in every layer.",
                      choices=("global", "layer"))

    def validate(self) -> None:
        super().validate()
        if self.nm is not None and self.scope != "global":
            raise InvalidOptionError("--scope does not apply to --pattern (N:M is per group by construction)")


DEFAULT_STEPS = 4
DEFAULT_RELATIVE_DAMPING = 0.1


@dataclass(frozen=True)
class LossFisher(Config):
    """Knobs of a Fisher of the model's loss: which output and likelihood define it, and its damping."""

    panel: ClassVar[str] = "Curvature methods (fls, obert, ief, mfac)"

    likelihood: str = knob("auto", "Output likelihood that defines the Fisher.", choices=LIKELIHOODS)
    output_name: str | None = knob(None, "Model output the likelihood applies to (default: the first).")
    damping: float | None = knob(None, "Absolute damping gamma of (F + gamma I)^-1 (default: relative, see --relative-damping).",
                                 min=0.0, min_open=True)
    relative_damping: float | None = knob(
        None, f"gamma = this x mean diag(F) (default {DEFAULT_RELATIVE_DAMPING}); not with --damping.", min=0.0, min_open=True,
    )

    def validate(self) -> None:
        super().validate()
        if self.damping is not None and self.relative_damping is not None:
            raise InvalidOptionError("give --damping (absolute) or --relative-damping, not both")

    @property
    def gamma_relative(self) -> float:
        return DEFAULT_RELATIVE_DAMPING if self.relative_damping is None else self.relative_damping


@dataclass(frozen=True)
class CurvatureConfig(GlobalScope, LossFisher, Recovery):
    """OBS with an inverse-Fisher estimate (needs the torch graph for gradients)."""

    panel: ClassVar[str] = "Curvature methods (fls, obert, ief, mfac)"
    needs: ClassVar[frozenset[str]] = frozenset({TORCH})

    steps: int | None = knob(
        None, f"Pruning sub-steps with curvature refits in between (default {DEFAULT_STEPS}; 1 for --pattern).", min=1, max=1000,
    )

    def validate(self) -> None:
        super().validate()
        if self.nm is not None and self.steps not in (None, 1):
            raise InvalidOptionError("--steps > 1 does not apply to --pattern (N:M is reached in one step)")
        if self.recovering and self.steps is not None:
            raise InvalidOptionError("give --steps (one-shot sub-steps) or --recover-steps (gradual schedule), not both")
        if self.recovering and self.nm is not None and self.recover_steps != 1:
            raise InvalidOptionError("--recover-steps > 1 does not apply to --pattern (N:M is reached in one step)")

    @property
    def num_steps(self) -> int:
        if self.nm is not None:
            return 1
        return DEFAULT_STEPS if self.steps is None else self.steps


DEFAULT_FIT_STEPS, DEFAULT_REFIT_STEPS = 200, 25
AUTO_FIT_WEIGHTS = 3_000_000
"""Above this many prunable weights the default fit/refit steps shrink in proportion (see :func:`auto_steps`)."""


def auto_steps(default: int, weights: int, minimum: int) -> int:
    """Default FishLeg step budget for a model with ``weights`` prunable weights: ``default`` up to
    :data:`AUTO_FIT_WEIGHTS`, ``default * AUTO_FIT_WEIGHTS / weights`` above, and 0 (no fit) once that is
    below ``minimum`` (half the default).

    One auxiliary step costs about linearly in the weights (Q's factor products and one Fisher-vector
    product), so the scaling keeps the fit's cost near that of a 3M-weight model's full budget. Below half
    the budget at which the fit converges (``benchmarks/fishleg_convergence.py``) it does not pay: on the
    10.6M-weight pretrained MiniLM encoder of ``benchmarks/transformer_encoder.py`` a 57 / 14-step fit was
    accepted by its validation check but moved the output cosine by at most 0.001 at 3.3x the time and 1.8x
    the peak memory (on a random-weight encoder it was rejected). Deterministic (a step count, not a time budget)."""
    if weights <= AUTO_FIT_WEIGHTS:
        return default
    steps = round(default * AUTO_FIT_WEIGHTS / weights)
    return steps if steps >= minimum else 0


@dataclass(frozen=True)
class FishLegFit(Config):
    """Knobs of the FishLeg auxiliary-loss fit (shared by ``prune -m fls`` and ``quantize -m fls``).

    200 fit steps: the knee of Q's error curve in ``benchmarks/fishleg_convergence.py`` (validation seeds;
    0.68 -> 0.38 relative error to the exact damped inverse at lr 1e-2; 800 steps reach 0.24 at 4x the cost).
    lr 5e-3 and 25 refit steps: chosen in ``benchmarks/fls_prune_time.py`` on the validation images of the
    autoencoder pruned to 90% (three seeds), where lr 1e-2 loses its first 50 steps to a rejected checkpoint:
    5e-3 at 200 / 25 steps ties 1e-2 at 200 / 50 (validation 96.31 vs 96.32) in ~15% less time, and on the
    6-5-4 MLP both lrs reach the same error at 200 steps (0.137, three seeds); on the 12-10-6 MLP of the
    convergence benchmark 1e-2 converges faster than 3e-3 (0.38 vs 0.59 at 200 steps; 5e-3 is not in its
    grid), so ``--aux-lr 1e-2`` may suit models whose first checkpoint accepts it (the fit halves a too
    large lr at every rejected checkpoint).
    """

    panel: ClassVar[str] = "FishLeg Surgeon (fls)"

    fit_steps: int | None = knob(
        None, f"FishLeg auxiliary-loss steps before the first pruning step (or the quantization sweep). Default "
        f"{DEFAULT_FIT_STEPS}, scaled by {AUTO_FIT_WEIGHTS // 1_000_000}M / (prunable weights) above {AUTO_FIT_WEIGHTS // 1_000_000}M "
        f"weights (a step costs about linearly more there), and 0 once that is under {DEFAULT_FIT_STEPS // 2} (a warning says so); "
        "the steps planned and run are in the report.", min=0, max=1_000_000)
    fit_seconds: float | None = knob(
        None, "Wall-clock budget of each fit/refit; the steps done are in the report (results then depend on machine speed).",
        min=0.0, min_open=True,
    )
    aux_lr: float = knob(5e-3, "Initial Adam learning rate of the auxiliary loss (halved at each validation checkpoint "
                         "that does not improve).", min=0.0, min_open=True, max=10.0)
    batch_size: int = knob(32, "Calibration samples per auxiliary-loss step (one Fisher-vector product).", min=1, max=1_000_000)
    probes: int = knob(1, "Gaussian probes per Fisher-vector product (one shared forward pass).", min=1, max=1024)
    precondition: bool = knob(True, "Preconditioned auxiliary update (back-propagate <Q r, Q u> instead of <r, Q u>).")
    fit_matmul: str = knob(
        "fast", "Arithmetic of the fit: 'fast' runs the Kronecker Q products of the auxiliary steps on bf16 copies and "
        "the other float32 matmuls of the steps with bf16 (oneDNN, CPUs with AVX512-BF16/AMX) "
        "or TF32 (CUDA) internal arithmetic where the machine has it; 'float32' never. Q's parameters and optimizer, "
        "its start, the validation checkpoints and the pruning are float32 either way (the report's fit_matmul / "
        "fit_q_products / fit_matmul_reason say what ran and why).",
        choices=("fast", "float32"))
    moment_samples: int = knob(128, "Samples for the gradient moments behind the kfac/diag start and the relative damping.",
                               min=1, max=1_000_000)


STRUCTURES = ("none", "channels", "neurons", "heads")


@dataclass(frozen=True)
class Structured(Recovery):
    """Structured pruning: remove whole channels / neurons and shrink the tensors (``fls_compress.structured``),
    optionally with distillation fine-tuning of the smaller graph (``--recover-steps N``: N structured prunes on
    the sparsity schedule, each followed by fine-tuning; :mod:`fls_compress.recovery.structured`)."""

    panel: ClassVar[str] = "Structured pruning (magnitude, sparsegpt)"

    structure: str = knob(
        "none", "Remove whole groups and shrink the ONNX tensors: channels (Conv output channels, with their bias, "
        "BatchNorm and the next layer's input channels), neurons (Gemm/MatMul hidden units); --sparsity is then the "
        "fraction of each group removed; heads (attention heads: Wq/Wk/Wv columns, Wo's input rows and the Reshape "
        "targets that hold the head count; at least one head kept per block). magnitude ranks by the L2 norm, "
        "sparsegpt by structured OBS on the next layer's Hessian (Wo for heads) and compensates it. none: "
        "unstructured zeros.", choices=STRUCTURES)
    channel_multiple: int = knob(
        1, "With --structure: keep a multiple of this many channels / neurons / heads in every group (the multiple nearest "
        "the --sparsity target, at least one multiple; onnxruntime's CPU convolutions run fastest at multiples of 8 "
        "or 16, see benchmarks/results/structured.md).", min=1, max=65536)

    def validate(self) -> None:
        super().validate()
        if self.structure != "none" and getattr(self, "pattern", None) is not None:
            raise InvalidOptionError("--pattern does not apply to --structure (whole channels/neurons are removed)")
        if self.structure == "none" and self.channel_multiple != 1:
            raise InvalidOptionError("--channel-multiple applies to --structure channels|neurons|heads only")
        if self.recovering and self.structure == "none":
            raise InvalidOptionError(f"--recover-steps with -m {self.method} needs --structure (gradual unstructured pruning "
                                     "with recovery: -m fls, obert, ief or mfac)")


@dataclass(frozen=True)
class MagnitudeConfig(GlobalScope, Structured):
    method: ClassVar[str] = "magnitude"
    summary: ClassVar[str] = "|w| (Han et al. 2015), global or per layer; no data, no update"


@dataclass(frozen=True)
class EmpiricalFisherConfig(CurvatureConfig):
    panel: ClassVar[str] = "Empirical Fisher (obert, ief, mfac)"
    num_grads: int = knob(256, "Per-example gradients m for the empirical Fisher (oBERT / iEF / M-FAC).", min=1, max=1_000_000)


@dataclass(frozen=True)
class OBertConfig(EmpiricalFisherConfig):
    method: ClassVar[str] = "obert"
    panel: ClassVar[str] = "oBERT / iEF"
    summary: ClassVar[str] = "OBS with the block-diagonal empirical-Fisher inverse (Kurtic et al. 2022; WoodFisher)"
    block_size: int = knob(50, "Block size B of the block-diagonal curvature (oBERT / iEF).", min=1, max=100_000)


@dataclass(frozen=True)
class IEFConfig(OBertConfig):
    method: ClassVar[str] = "ief"
    summary: ClassVar[str] = "oBERT with improved-empirical-Fisher vectors (Wu et al. 2024)"


@dataclass(frozen=True)
class MFACConfig(EmpiricalFisherConfig):
    method: ClassVar[str] = "mfac"
    summary: ClassVar[str] = "OBS with the matrix-free inverse empirical Fisher over all weights (Frantar et al. 2021)"


@dataclass(frozen=True)
class ActivationCapture(Config):
    """Knobs of capturing layer inputs with onnxruntime (shared by sparsegpt/wanda and ``quantize -m gptq``)."""

    panel: ClassVar[str] = "Activation capture (sparsegpt, wanda; quantize gptq)"

    sequential: bool = knob(True, "Recapture each layer's inputs on the model already compressed upstream (as the papers do).")
    max_rows_per_layer: int | None = knob(
        DEFAULT_MAX_ROWS, "Activation rows per layer at most (seeded random subsample of positions on big feature maps).",
        min=1, max=1 << 40,
    )


@dataclass(frozen=True)
class LayerwiseConfig(PruneConfig, ActivationCapture):
    """Layer-wise methods: uniform sparsity per layer from captured layer inputs (onnxruntime, no torch)."""

    panel: ClassVar[str] = "Layer-wise (sparsegpt, wanda)"
    needs: ClassVar[frozenset[str]] = frozenset({ACTIVATIONS})


@dataclass(frozen=True)
class SparseGPTConfig(LayerwiseConfig, Structured):
    method: ClassVar[str] = "sparsegpt"
    panel: ClassVar[str] = "SparseGPT"
    summary: ClassVar[str] = "layer-wise OBS, Cholesky sweep with lazy blocks (Frantar & Alistarh 2023)"
    percdamp: float = knob(0.01, "Damping of the layer Hessian, as a fraction of its mean diagonal.", min=0.0, max=10.0)
    lazy_block: int = knob(128, "Columns per lazy block; the adaptive mask is chosen per block.", min=1, max=65536)


@dataclass(frozen=True)
class WandaConfig(LayerwiseConfig):
    method: ClassVar[str] = "wanda"
    summary: ClassVar[str] = "|W_ij| * ||X_j|| per output row, no update (Sun et al. 2024)"


DEFAULT_Q_BLOCK = 50


@dataclass(frozen=True)
class FLSConfig(CurvatureConfig, FishLegFit):
    """FishLeg Surgeon: OBS with the learned inverse Fisher Q(lambda) (Garcia et al. 2023; McGowan et al. 2024)."""

    method: ClassVar[str] = "fls"
    panel: ClassVar[str] = "FishLeg Surgeon (fls)"
    summary: ClassVar[str] = "OBS with the FishLeg learned inverse Fisher Q(lambda) (the FishLeg Surgeon)"

    q_form: str = knob("kron", "FishLeg Q structure: kron (Kronecker D_A(R^T R x L L^T)D_A), ekfac (Kronecker with a learned "
                       "inner diagonal; its kfac start is the exact damped K-FAC inverse) or block (block-diagonal).",
                       choices=("kron", "ekfac", "block"))
    block_size: int | None = knob(None, f"Block size of the block-diagonal Q (--q-form block only; default {DEFAULT_Q_BLOCK}).",
                                  min=1, max=100_000)
    q_init: str | None = knob(
        None, "Q start: kfac (damped inverse Kronecker factors of per-example gradients; exact damped inverse with ekfac; "
        "not block), diag (1/(diag F + gamma)) or identity (I/gamma). Default: kfac for kron/ekfac, diag for block.",
        choices=("kfac", "diag", "identity"),
    )
    refit_steps: int | None = knob(
        None, f"FishLeg auxiliary-loss steps between pruning sub-steps. Default {DEFAULT_REFIT_STEPS}, scaled "
        "like --fit-steps.", min=0, max=1_000_000)
    refit: str = knob("warm", "Between pruning sub-steps: warm (keep fitting Q from where it is, FLS's progressive assimilation) "
                      "or restart (re-estimate Q's start from the pruned model's gradients, oBERT-style, then fit).",
                      choices=("warm", "restart"))
    obs_update: str | None = knob(
        None, "Compensation: auto (row-exact for layers with up to 2048 inputs, sweep above; each layer's choice is in "
        "the report), row-exact (exact group OBS per output row with Q's factors; kron), sweep (OBS column sweep, one "
        "Cholesky per layer, compensates only later columns; kron), block-exact (block) or decoupled (-Q z). "
        "Default: auto for kron/ekfac, block-exact for block.",
        choices=("auto", "sweep", "row-exact", "block-exact", "decoupled"),
    )

    def validate(self) -> None:
        super().validate()
        if self.q_form != "block" and self.block_size is not None:
            raise InvalidOptionError("--block-size applies to --q-form block only")
        if self.q_form == "block" and self.q_init == "kfac":
            raise InvalidOptionError("--q-init kfac needs --q-form kron or ekfac (Kronecker factors)")
        if self.q_form == "block" and self.obs_update in ("auto", "sweep", "row-exact"):
            raise InvalidOptionError(f"--obs-update {self.obs_update} needs --q-form kron or ekfac")
        if self.q_form != "block" and self.obs_update == "block-exact":
            raise InvalidOptionError("--obs-update block-exact needs --q-form block")

    @property
    def resolved_init(self) -> str:
        return self.q_init or ("diag" if self.q_form == "block" else "kfac")

    @property
    def resolved_update(self) -> str:
        return self.obs_update or ("block-exact" if self.q_form == "block" else "auto")


@dataclass(frozen=True)
class AutoConfig(PruneConfig):
    """``-m auto``: FLS when onnx2torch converts the graph, else SparseGPT (the choice is in the report)."""

    method: ClassVar[str] = "auto"
    summary: ClassVar[str] = "fls when the graph converts to torch, else sparsegpt (recorded in the report)"

    def resolve(self, convertible: bool) -> PruneConfig:
        target = FLSConfig if convertible else SparseGPTConfig
        return target(sparsity=self.sparsity, pattern=self.pattern, exclude=self.exclude)
