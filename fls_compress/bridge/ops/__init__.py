"""Our own onnx2torch converters, one module per operator family, and what we refuse and why.

onnx2torch 1.5 converts about half of the default-domain ONNX operators, capped at the opsets of
2024. This package adds, through onnx2torch's own registry (``add_converter``):

* new operators, each an ``nn.Module`` written from the ONNX operator spec: :mod:`.activations`,
  :mod:`.pooling`, :mod:`.normalization`, :mod:`.attention`, :mod:`.tensor`, :mod:`.resampling`,
  :mod:`.integer`, :mod:`.spectral`;
* replacements where onnx2torch's converter is wrong: :mod:`.resize` (Resize-11+, from the spec),
  ScatterND-16/18 (reductions) in :mod:`.tensor`;
* newer versions of operators onnx2torch has, where the schema changed only in the element types it
  admits (opset 22 added bfloat16 to most float operators, 23 the 4-bit types):
  :data:`TYPE_ONLY_ALIASES`, each checked against the ONNX schemas by the tests;

:data:`REFUSED` names the default-domain operators nobody converts and why (random sampling,
sequences, strings, quantised arithmetic, control flow), for the coverage table and error messages.
"""

from __future__ import annotations

import logging

from onnx2torch.node_converters import registry
from onnx2torch.node_converters.registry import add_converter, get_converter

from . import activations, attention, integer, normalization, pooling, resampling, resize, spectral, tensor  # noqa: F401 - declare converters
from ._common import OURS, Declared

_LOG = logging.getLogger(__name__)

#: (op, version onnx2torch (or the compat layer) converts, newer versions with the same attributes and inputs)
TYPE_ONLY_ALIASES: tuple[tuple[str, int, tuple[int, ...]], ...] = (
    ("Acos", 7, (22,)), ("Asin", 7, (22,)), ("Atan", 7, (22,)), ("Cos", 7, (22,)), ("Sin", 7, (22,)), ("Tan", 7, (22,)),
    ("AveragePool", 19, (22,)), ("Conv", 11, (22,)), ("ConvTranspose", 11, (22,)), ("Dropout", 13, (22,)),
    ("Elu", 6, (22,)), ("EyeLike", 9, (22,)), ("GlobalAveragePool", 1, (22,)), ("HardSigmoid", 6, (22,)),
    ("HardSwish", 14, (22,)), ("InstanceNormalization", 6, (22,)), ("MaxPool", 12, (22,)), ("RoiAlign", 16, (22,)),
    ("Round", 11, (22,)), ("Selu", 6, (22,)), ("Softplus", 1, (22,)), ("Softsign", 1, (22,)),
    ("LSTM", 14, (22,)), ("GRU", 14, (22,)), ("RNN", 14, (22,)),
    ("Cast", 21, (23,)), ("Constant", 21, (23,)), ("ConstantOfShape", 21, (23,)), ("Flatten", 21, (23,)),
    ("Identity", 21, (23,)), ("Pad", 21, (23,)), ("Reshape", 21, (23,)), ("Shape", 21, (23,)), ("Size", 21, (23,)),
    ("Squeeze", 21, (23,)), ("Transpose", 21, (23,)), ("Unsqueeze", 21, (23,)),
)

_RANDOM = "random sampling: no deterministic function to differentiate"
_SEQUENCE = "sequence/optional values: onnx2torch's graph carries tensors only"
_STRING = "string or byte data: not differentiable"
_QUANT = "quantised arithmetic: compress the float model instead (a quantised model is refused up front)"
_CONTROL = "control flow: bodies are subgraphs (an If whose condition is constant on the calibration data is folded first)"
_TRAINING = "training loss: not part of an inference graph"

#: default-domain operators neither onnx2torch nor this package converts, with the reason
REFUSED: dict[str, str] = {
    **{op: _RANDOM for op in ("Bernoulli", "Multinomial", "RandomNormal", "RandomNormalLike", "RandomUniform",
                              "RandomUniformLike")},
    **{op: _SEQUENCE for op in ("ConcatFromSequence", "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase",
                                "SequenceInsert", "SequenceLength", "SequenceMap", "SplitToSequence", "Optional",
                                "OptionalGetElement", "OptionalHasElement")},
    **{op: _STRING for op in ("StringConcat", "StringNormalizer", "StringSplit", "RegexFullMatch", "TfIdfVectorizer",
                              "ImageDecoder")},
    **{op: _QUANT for op in ("ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", "QuantizeLinear",
                             "DequantizeLinear", "DynamicQuantizeLinear")},
    **{op: _CONTROL for op in ("If", "Loop", "Scan")},
    **{op: _TRAINING for op in ("NegativeLogLikelihoodLoss", "SoftmaxCrossEntropyLoss")},
    "Unique": "data-dependent output of sorted/first-occurrence indices: integer bookkeeping with no gradient",
    "MaxRoiPool": "region pooling with integer box quantisation; no exporter in use emits it (RoiAlign is converted)",
    "MelWeightMatrix": "constant generator of a filter bank, not implemented yet",
}

_installed = False


def _registered(op: str, version: int) -> bool:
    description = registry.OperationDescription(domain="", operation_type=op, version=version)
    return description in registry._CONVERTER_REGISTRY  # noqa: SLF001 - onnx2torch has no query API


def converted_by_us() -> dict[str, dict[str, object]]:
    """op -> {"versions": [...], "family": module, "kind": "own"|"override"|"alias"} of this package."""
    out: dict[str, dict[str, object]] = {}
    for decl in OURS:
        entry = out.setdefault(decl.op, {"versions": [], "family": decl.family,
                                         "kind": "override" if decl.override else "own"})
        entry["versions"] = sorted(set(entry["versions"]) | set(decl.versions))  # type: ignore[arg-type]
    for op, _base, versions in TYPE_ONLY_ALIASES:
        entry = out.setdefault(op, {"versions": [], "family": "aliases", "kind": "alias"})
        entry["versions"] = sorted(set(entry["versions"]) | set(versions))  # type: ignore[arg-type]
    return out


def install_ops() -> None:
    """Register every converter of the package in onnx2torch's registry (idempotent; never replaces
    a converter already registered for that op and version)."""
    global _installed  # noqa: PLW0603 - one process-wide registry
    if _installed:
        return
    decl: Declared
    for decl in OURS:
        for version in decl.versions:
            if decl.override:  # add_converter refuses to replace; the registry is a plain dict
                description = registry.OperationDescription(domain="", operation_type=decl.op, version=version)
                registry._CONVERTER_REGISTRY[description] = decl.fn  # noqa: SLF001 - see above
            elif not _registered(decl.op, version):
                add_converter(operation_type=decl.op, version=version)(decl.fn)
    for op, base, versions in TYPE_ONLY_ALIASES:
        fn = get_converter(op, base)
        for version in versions:
            if not _registered(op, version):
                add_converter(operation_type=op, version=version)(fn)
    _installed = True
    _LOG.debug("own converters installed: %d operators", len(converted_by_us()))
