"""Convert an ONNX model to a trainable torch module with a verified initializer-name map.

The torch module exists only to compute gradients/curvature; results go back into the original
ONNX graph by initializer name. onnx2torch does not keep those names, absorbs Conv/Gemm weights into
``nn.Conv*``/``nn.Linear`` (Gemm: transposed when ``transB=0``, scaled by ``alpha``) and stores
every other constant - including MatMul weights - as a buffer, one separate copy per use. This
module therefore

1. prepares a copy of the graph (:mod:`.prep`) and installs newer-opset converters (:mod:`.compat`),
2. refuses, up front and in one line, graphs with operators onnx2torch cannot convert,
3. converts, and rewrites the fx output so ``forward`` returns outputs in ONNX output order,
4. maps every prunable initializer to exactly ONE ``nn.Parameter`` - promoting buffers and tying
   every copy of a shared initializer to the same object - and freezes everything else,
5. checks that each mapped parameter, mapped back with :meth:`PrunableWeight.to_onnx`, equals the
   ONNX initializer.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx2torch
import torch
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from torch import fx, nn

from fls_compress.bridge.check import REL_TOLERANCE, check_conversion, gate_conversion
from fls_compress.bridge.compat import install_compat
from fls_compress.bridge.constant_fold import fold_recurrent_weights
from fls_compress.bridge.control_flow import fold_constant_ifs
from fls_compress.bridge.divergence import locate_divergence
from fls_compress.bridge.prep import bind_inputs, prepare_for_torch, to_float32
from fls_compress.bridge.rnn import OnnxRecurrent
from fls_compress.bridge.shapes import annotate_shapes
from fls_compress.bridge.support import unsupported, unsupported_ops  # noqa: F401 - unsupported_ops re-exported
from fls_compress.bridge.weights import PrunableWeight
from fls_compress.errors import InvalidDataError, UnsupportedModelError
from fls_compress.io.calibration import CalibrationData
from fls_compress.io.onnx_model import ALL_PRUNABLE_OPS, PrunableSite, prunable_sites, read_weight

_LOG = logging.getLogger(__name__)

#: (transpose, scale) of a torch tensor relative to its ONNX initializer.
_Relation = tuple[bool, float]
_IDENTITY: _Relation = (False, 1.0)


@dataclass
class TorchBridge:
    """A converted model plus the link from ONNX initializer names to torch parameters.

    ``input_names``/``output_names`` are the ONNX graph inputs (initializers and inputs bound to a
    calibration constant excluded) and outputs; ``weights`` holds one :class:`PrunableWeight` per
    prunable weight, in graph order. ``info`` records what conversion had to do to the graph
    (see :func:`convert_to_torch`), for the report.
    """

    module: fx.GraphModule
    input_names: list[str]
    output_names: list[str]
    weights: dict[str, PrunableWeight] = field(default_factory=dict)
    info: dict[str, object] = field(default_factory=dict)
    batch_axes: dict[str, int] = field(default_factory=dict)

    def forward(self, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Run the module on named inputs; outputs come back as a list in ONNX output order.

        Inputs listed in :attr:`batch_axes` are given with their samples on axis 0 (as
        :class:`~fls_compress.io.calibration.CalibrationData` stores them) and moved into place here.
        """
        missing = [n for n in self.input_names if n not in feeds]
        unknown = sorted(set(feeds) - set(self.input_names))
        if missing or unknown:
            raise InvalidDataError(
                f"model inputs are {self.input_names}; missing {missing}, unexpected {unknown}"
            )
        args = []
        for name in self.input_names:
            value = feeds[name]
            if torch.is_tensor(value) and value.is_floating_point() and value.dtype != torch.float32:
                value = value.float()  # float16/float64 models compute in float32 here
            if name in self.batch_axes:  # samples come on axis 0 (CalibrationData layout)
                value = value.movedim(0, self.batch_axes[name])
            args.append(value)
        return list(self.module(*args))

    def parameters_by_name(self) -> dict[str, nn.Parameter]:
        """ONNX initializer name -> the trainable parameter standing for it."""
        return {name: weight.parameter for name, weight in self.weights.items()}


# ------------------------------------------------------------------------------------------------
# Conversion
# ------------------------------------------------------------------------------------------------
def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _rewrite_outputs(
    module: fx.GraphModule, graph: OnnxGraph, input_names: list[str], output_names: list[str]
) -> None:
    """Make the fx graph return a tuple with exactly the ONNX outputs, in ONNX order.

    onnx2torch returns a bare tensor for one output and the whole tuple of a multi-output node
    (deduplicated); this picks each named value instead.
    """
    fx_graph = module.graph
    by_target = {n.target: n for n in fx_graph.nodes if n.op == "call_module"}
    placeholders = [n for n in fx_graph.nodes if n.op == "placeholder"]
    values: dict[str, fx.Node] = dict(zip(input_names, placeholders))
    output_node = next(n for n in fx_graph.nodes if n.op == "output")
    picked: list[fx.Node] = []
    with fx_graph.inserting_before(output_node):
        for name in output_names:
            if name in values:
                picked.append(values[name])
                continue
            try:
                onnx_node, index = graph.value_as_node_output(name)
            except KeyError as exc:
                raise UnsupportedModelError(f"graph output {name!r} is not computed by any node") from exc
            fx_node = by_target[onnx_node.unique_name]
            if len(onnx_node.output_values) > 1:
                fx_node = fx_graph.call_function(operator.getitem, (fx_node, index))
            picked.append(fx_node)
    output_node.args = (tuple(picked),)
    fx_graph.lint()
    module.recompile()


@dataclass
class _Use:
    """One place in the converted module that holds a copy of an initializer."""

    owner: nn.Module
    attr: str
    relation: _Relation


def _value_args(fx_node: fx.Node, module: nn.Module) -> list[tuple[str, object]]:
    """(ONNX value name, fx argument) pairs of a converted node.

    onnx2torch passes the non-empty ``onnx_mapping.inputs`` positionally, moving those after the
    first omitted optional input into kwargs (in order), so flattening args+kwargs realigns them.
    """
    values = [v for v in module.onnx_mapping.inputs if v != ""]
    flat = list(fx_node.args) + list(fx_node.kwargs.values())
    return list(zip(values, flat))


def _uses_of(
    name: str, gm: fx.GraphModule, graph: OnnxGraph, fx_by_target: dict[str, fx.Node]
) -> list[_Use]:
    """Every copy of initializer ``name`` held by the converted module."""
    uses: list[_Use] = []
    for unique_name, onnx_node in graph.nodes.items():
        if name not in onnx_node.input_values:
            continue
        module = gm.get_submodule(unique_name)
        # asymmetric padding: onnx2torch wraps the layer as Sequential(pad, conv)
        layer = module[-1] if isinstance(module, nn.Sequential) else module
        positions = [i for i, v in enumerate(onnx_node.input_values) if v == name]
        if isinstance(layer, nn.modules.conv._ConvNd) and onnx_node.operation_type == "Conv" and positions == [1]:
            uses.append(_Use(layer, "weight", _IDENTITY))
            continue
        if isinstance(module, OnnxRecurrent) and positions in ([1], [2]):
            uses.append(_Use(module, "W" if positions == [1] else "R", _IDENTITY))
            continue
        if isinstance(module, nn.Linear) and onnx_node.operation_type == "Gemm" and positions == [1]:
            trans_b = onnx_node.attributes.get("transB", 0) != 0
            uses.append(_Use(module, "weight", (not trans_b, float(onnx_node.attributes.get("alpha", 1.0)))))
            continue
        attrs = [
            arg.target
            for value, arg in _value_args(fx_by_target[unique_name], module)
            if value == name and isinstance(arg, fx.Node) and arg.op == "get_attr"
        ]
        if len(attrs) != len(positions):
            raise UnsupportedModelError(
                f"initializer {name!r} is also read by {onnx_node.operation_type} node {onnx_node.name!r} "
                "through a private copy, so it cannot be tied to one trainable tensor"
            )
        for target in attrs:
            owner_path, _, attr = str(target).rpartition(".")
            uses.append(_Use(gm.get_submodule(owner_path), attr, _IDENTITY))
    return uses


def _first_consumer(site: PrunableSite, graph: OnnxGraph) -> OnnxNode:
    for onnx_node in graph.nodes.values():
        inputs = onnx_node.input_values
        if onnx_node.operation_type == site.op_type and len(inputs) > site.input_index:
            if inputs[site.input_index] == site.name:
                return onnx_node
    raise UnsupportedModelError(f"no {site.op_type} node reads initializer {site.name!r} after preparation")


def _tie(name: str, uses: list[_Use]) -> nn.Parameter:
    """One Parameter for all ``uses`` (they must agree on layout); buffers are promoted in place."""
    relations = {use.relation for use in uses}
    if len(relations) != 1:
        raise UnsupportedModelError(
            f"initializer {name!r} is used in incompatible layouts (e.g. by Gemm and MatMul); cannot tie it"
        )
    first = getattr(uses[0].owner, uses[0].attr)
    param = first if isinstance(first, nn.Parameter) else nn.Parameter(first.detach())
    for use in uses:
        current = getattr(use.owner, use.attr)
        if current is param:
            continue
        if isinstance(current, nn.Parameter):
            setattr(use.owner, use.attr, param)
        else:
            delattr(use.owner, use.attr)
            use.owner.register_parameter(use.attr, param)
    return param


def _build_weights(
    original: onnx.ModelProto, sites: list[PrunableSite], gm: fx.GraphModule, graph: OnnxGraph
) -> dict[str, PrunableWeight]:
    fx_by_target = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    weights: dict[str, PrunableWeight] = {}
    for site in sites:
        uses = _uses_of(site.name, gm, graph, fx_by_target)
        if not uses:
            raise UnsupportedModelError(f"initializer {site.name!r} has no counterpart in the converted module")
        param = _tie(site.name, uses)
        transpose, scale = uses[0].relation
        if site.op_type == "MatMul":
            matrix_transpose = site.input_index == 1  # X @ W keeps W as [in, out]
        elif site.op_type == "Gemm" and not isinstance(uses[0].owner, nn.Linear):
            # B kept verbatim as a buffer (e.g. transA=1): [in, out] unless transB=1
            matrix_transpose = _first_consumer(site, graph).attributes.get("transB", 0) == 0
        else:
            matrix_transpose = False
        weights[site.name] = PrunableWeight(
            name=site.name,
            op_type=site.op_type,
            parameter=param,
            onnx_shape=site.shape,
            onnx_dtype=np.dtype(site.dtype),
            transpose=transpose,
            scale=scale,
            matrix_transpose=matrix_transpose,
            consumers=site.node_names,
        )
    return weights


def _verify_weights(original: onnx.ModelProto, weights: dict[str, PrunableWeight]) -> None:
    for name, weight in weights.items():
        expected = read_weight(original, name)
        got = weight.to_onnx()
        if got.shape != expected.shape or not np.allclose(
            got.astype(np.float64), expected.astype(np.float64), rtol=1e-6, atol=0.0
        ):
            raise UnsupportedModelError(f"torch tensor mapped to initializer {name!r} does not reproduce it")


def convert_to_torch(
    model: onnx.ModelProto,
    *,
    prunable_ops: tuple[str, ...] = ALL_PRUNABLE_OPS,
    calibration: CalibrationData | None = None,
    tolerance: float = REL_TOLERANCE,
    on_mismatch: str = "fail",
) -> TorchBridge:
    """Convert ``model`` (left unmodified) into a :class:`TorchBridge`.

    With ``calibration`` (recommended; the pipeline passes its calibration set) the copy used for
    conversion is first specialised to the data, each step recorded in ``bridge.info``:

    * rank-0 inputs become constants holding :attr:`CalibrationData.constants` (``bound_inputs``);
    * ``If`` nodes whose condition is the same on every calibration batch are replaced by the branch
      taken (``folded_ifs``, :mod:`.control_flow`); the weights of the taken branch become prunable
      like top-level ones (written back inside the branch), those of other bodies stay as they are
      (``unpruned_branch_weights``);
    * shapes ONNX inference cannot derive are observed with onnxruntime (``observed_shapes``,
      :mod:`.shapes`);
    * LSTM/GRU weights computed from constants are evaluated once (``computed_recurrent_weights``,
      :mod:`.constant_fold`; done with or without calibration);
    * after conversion, the module is run against onnxruntime on one batch
      (``max_rel_error_vs_onnxruntime``, :mod:`.check`; a torch failure there is unsupported). Above
      ``tolerance`` the first diverging node is located (:mod:`.divergence`) and the conversion is
      refused (``on_mismatch="fail"``) or kept with a warning (``"warn"``), unless the divergence is
      onnxruntime's kernel departing from the spec (:func:`.check.gate_conversion`).

    float16 / bfloat16 / float64 models are converted to compute in float32 (``compute_dtype``);
    :meth:`PrunableWeight.to_onnx` returns the original dtype. Raises
    :class:`UnsupportedModelError` (one line, naming the operators and the methods that need no
    torch graph) when operators cannot be converted, when onnx2torch fails, or when a prunable
    weight cannot be mapped to one verified parameter.
    """
    sites = prunable_sites(model, prunable_ops, include_subgraphs=True)
    info: dict[str, object] = {"bound_inputs": [], "folded_ifs": [], "observed_shapes": 0, "compute_dtype": "float32"}
    work = model
    feeds: list[dict[str, np.ndarray]] = []
    if calibration is not None:
        if calibration.constants:
            work = bind_inputs(work, calibration.constants)
            info["bound_inputs"] = sorted(calibration.constants)
        n = calibration.num_samples
        sizes = [1] if calibration.max_batch == 1 or n < 2 else [1, min(n, 2)]
        feeds = [calibration.to_model_layout({k: v[:size] for k, v in calibration.inputs.items()}) for size in sizes]
    prepared = prepare_for_torch(work)
    if feeds:
        prepared, folded = fold_constant_ifs(prepared, feeds)
        if folded:
            info["folded_ifs"] = folded
            prepared = prepare_for_torch(prepared)
        prepared, observed = annotate_shapes(prepared, feeds)
        info["observed_shapes"] = len(observed)
    available = {t.name for t in prepared.graph.initializer}
    idle = [s.name for s in sites if s.subgraph is not None and s.name not in available]
    sites = [s for s in sites if s.subgraph is None or s.name in available]
    if idle:
        info["unpruned_branch_weights"] = idle
        _LOG.warning("%d weight(s) in If/Loop/Scan bodies not taken on the calibration data stay unpruned", len(idle))
    prepared, computed = fold_recurrent_weights(prepared)
    if computed:
        info["computed_recurrent_weights"] = computed
    prepared, widened = to_float32(prepared)
    if widened:
        info["compute_dtype"] = "float32 (model stores " + ", ".join(sorted({s.dtype for s in sites} - {"float32"}) or ["other float types"]) + ")"
        _LOG.warning("model is not float32; calibration computes in float32 and writes back in the original dtype")
    install_compat()
    missing = unsupported_ops(prepared)
    if missing:
        raise unsupported(f"unsupported operators for conversion: {', '.join(missing)}")
    try:
        gm = onnx2torch.convert(prepared, attach_onnx_mapping=True)
    except Exception as exc:  # noqa: BLE001 - onnx2torch signals unsupported features with many types
        raise unsupported(f"onnx2torch cannot convert the model: {_one_line(exc)}") from exc
    gm.eval()
    gm.float()

    initializer_names = {t.name for t in prepared.graph.initializer}
    input_names = [vi.name for vi in prepared.graph.input if vi.name not in initializer_names]
    output_names = [vi.name for vi in model.graph.output]
    graph = OnnxGraph(prepared.graph)
    _rewrite_outputs(gm, graph, input_names, output_names)

    weights = _build_weights(model, sites, gm, graph)
    for param in gm.parameters():
        param.requires_grad_(False)
    for weight in weights.values():
        weight.parameter.requires_grad_(True)
    _verify_weights(model, weights)
    bridge = TorchBridge(module=gm, input_names=input_names, output_names=output_names, weights=weights, info=info)
    if calibration is not None:
        bridge.batch_axes = {k: v for k, v in calibration.batch_axes.items() if k in input_names}
        rows = 1 if calibration.max_batch == 1 else min(2, calibration.num_samples)
        batch = {k: v[:rows] for k, v in calibration.inputs.items()}
        feed = calibration.feed(batch)
        try:
            error = check_conversion(model, bridge.forward, batch, feed)
        except UnsupportedModelError as exc:
            raise unsupported(str(exc)) from exc
        info["max_rel_error_vs_onnxruntime"] = error
        info["conversion_tol"] = tolerance

        def locate() -> dict[str, object]:
            args = [torch.from_numpy(np.ascontiguousarray(feed[name])) for name in input_names]
            args = [a.float() if a.is_floating_point() else a for a in args]
            return locate_divergence(model, gm, args, feed, tolerance)

        try:
            info.update(gate_conversion(error, tolerance, locate, on_mismatch=on_mismatch))
        except UnsupportedModelError as exc:
            raise unsupported(str(exc)) from exc
    _LOG.info(
        "converted model: %d prunable weights (%d elements)",
        len(weights),
        sum(w.numel for w in weights.values()),
    )
    return bridge
