"""The converter package (``fls_compress.bridge.ops``): every converter on one-node models over its
attribute space, against onnxruntime (relative L2 error <= 1e-5 in float32; integer and boolean
outputs exactly), gradients checked numerically (float64 ``gradcheck``) where the case says so."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.defs
import onnxruntime as ort
import pytest
import torch
from onnx.reference import ReferenceEvaluator

from fls_compress.bridge.compat import install_compat
from fls_compress.bridge.convert import convert_to_torch, unsupported_ops
from fls_compress.bridge.ops import REFUSED, TYPE_ONLY_ALIASES, converted_by_us
from fls_compress.errors import UnsupportedModelError
from tests.op_cases import CASES, OpCase, rand

REL_TOL = 1e-5


def _global_lp_pool(case: OpCase) -> list[np.ndarray]:
    x, p = case.inputs["x"].astype(np.float64), case.attrs.get("p", 2)
    axes = tuple(range(2, x.ndim))
    return [(np.sum(np.abs(x) ** p, axis=axes, keepdims=True) ** (1.0 / p)).astype(np.float32)]


#: numpy references of the spec for ops that neither onnxruntime 1.32 nor onnx.reference implements
NUMPY_REFERENCE = {"GlobalLpPool": _global_lp_pool}


def _reference(case: OpCase) -> list[np.ndarray]:
    """onnxruntime's outputs; where onnxruntime 1.32 has no kernel for the op at this opset (it
    says NOT_IMPLEMENTED), the ONNX reference implementation of the spec (``onnx.reference``)."""
    model = case.model()
    if case.onnx_reference:
        return list(ReferenceEvaluator(model).run(None, case.inputs))
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime's NotImplemented is not importable by name
        if type(exc).__name__ != "NotImplemented":
            raise
        if case.op in NUMPY_REFERENCE:
            return NUMPY_REFERENCE[case.op](case)
        return list(ReferenceEvaluator(model).run(None, case.inputs))
    return session.run(None, case.inputs)


def _converted(case: OpCase):
    return convert_to_torch(case.model())


def _rel(got: np.ndarray, ref: np.ndarray) -> float:
    ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
    return float(np.linalg.norm(got64 - ref64) / max(np.linalg.norm(ref64), 1e-30))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_converter_matches_onnxruntime(case: OpCase) -> None:
    bridge = _converted(case)
    with torch.no_grad():
        got = bridge.forward({k: torch.from_numpy(v) for k, v in case.inputs.items()})
    ref = _reference(case)
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        g = g.detach().numpy()
        assert g.shape == r.shape, (g.shape, r.shape)
        if r.dtype.kind in "fc":
            assert g.dtype == r.dtype
            finite = np.isfinite(r)
            np.testing.assert_array_equal(g[~finite], r[~finite])  # -inf of masked positions
            assert _rel(g[finite], r[finite]) <= REL_TOL, _rel(g[finite], r[finite])
        else:
            np.testing.assert_array_equal(g, r)


GRAD_CASES = [c for c in CASES if c.grad]


@pytest.mark.parametrize("case", GRAD_CASES, ids=[c.id for c in GRAD_CASES])
def test_converter_gradients(case: OpCase) -> None:
    """Autograd through the converted module equals central differences (float64), for the inputs
    and weights the case lists (weights given as initializers are fed as inputs here)."""
    bridge = _converted(case)
    module = bridge.module.double()
    names = list(case.inputs)
    values = {**{k: torch.from_numpy(v).double() for k, v in case.inputs.items()}}
    consts = {k: torch.from_numpy(v).double() for k, v in case.consts.items()}
    # weights (initializers) live as buffers or parameters: differentiate through them by substitution
    const_names = [n for n in case.grad if n in consts]
    holders = {}
    for n in const_names:
        holder = _holder_of(bridge, case, n)
        holders[n] = holder

    def fn(*tensors):
        feed = dict(values)
        for n, t in zip(case.grad, tensors):
            if n in consts:
                owner, attr = holders[n]
                _set(owner, attr, t)
            else:
                feed[n] = t
        out = module(*[feed[n] for n in names])
        return out[0] if isinstance(out, tuple) else out

    args = [(consts[n] if n in consts else values[n]).clone().requires_grad_(True) for n in case.grad]
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-5, rtol=1e-4)


def _holder_of(bridge, case: OpCase, name: str):
    target = torch.from_numpy(case.consts[name]).double()
    for owner in bridge.module.modules():
        for attr, value in list(owner.named_parameters(recurse=False)) + list(owner.named_buffers(recurse=False)):
            if value.shape == target.shape and torch.equal(value.detach(), target):
                return owner, attr
    raise AssertionError(f"no tensor of the converted module holds {name}")


def _set(owner: torch.nn.Module, attr: str, value: torch.Tensor) -> None:
    if attr in owner._parameters:
        del owner._parameters[attr]
    if attr in owner._buffers:
        del owner._buffers[attr]
    setattr(owner, attr, value)


def _signature(schema):
    attrs = tuple(sorted((a.name, a.type, a.default_value.SerializeToString() if a.default_value else b"", a.required)
                         for a in schema.attributes.values()))
    return (attrs, tuple((i.name, i.option) for i in schema.inputs), tuple((o.name, o.option) for o in schema.outputs),
            schema.min_input, schema.max_input, schema.min_output, schema.max_output)


@pytest.mark.parametrize("op,base,versions", TYPE_ONLY_ALIASES, ids=[a[0] for a in TYPE_ONLY_ALIASES])
def test_type_only_aliases_are_type_only(op: str, base: int, versions: tuple[int, ...]) -> None:
    """An alias is only declared where the newer schema has the same attributes (defaults included),
    inputs and outputs as the converted version: only the admitted element types changed."""
    for version in versions:
        new = onnx.defs.get_schema(op, version, "")
        assert new.since_version == version
        assert _signature(new) == _signature(onnx.defs.get_schema(op, base, ""))


def test_every_declared_op_version_has_a_tested_case() -> None:
    tested = {(c.op, c.opset) for c in CASES}
    by_op: dict[str, set[int]] = {}
    for op, opset in tested:
        by_op.setdefault(op, set()).add(onnx.defs.get_schema(op, opset, "").since_version)
    for op, entry in converted_by_us().items():
        if entry["kind"] in ("own", "override"):
            assert set(entry["versions"]) <= by_op.get(op, set()), (op, entry["versions"], by_op.get(op))


def test_refused_ops_are_not_converted_and_named() -> None:
    install_compat()
    ours = converted_by_us()
    assert not set(REFUSED) & {op for op, e in ours.items() if e["kind"] == "own"}
    model = OpCase("RandomNormalLike", 22, {"x": rand(2, 3)}).model()
    assert unsupported_ops(model) == ["RandomNormalLike (opset 22)"]


def test_refused_resize_policy_is_unsupported_not_wrong() -> None:
    case = OpCase("Resize", 18, {"x": rand(1, 2, 4, 4)}, {"keep_aspect_ratio_policy": "not_larger"},
                  order=["x", None, None, "sizes"], consts={"sizes": np.array([1, 2, 3, 3], np.int64)})
    with pytest.raises(UnsupportedModelError, match="keep_aspect_ratio_policy"):
        convert_to_torch(case.model())


def test_refused_attribute_combination_is_unsupported_not_wrong() -> None:
    case = OpCase("GroupNormalization", 21, {"x": rand(2, 4, 3)}, {"num_groups": 2, "stash_type": 10},
                  consts={"scale": rand(4), "bias": rand(4)})
    with pytest.raises(UnsupportedModelError, match="stash_type"):
        convert_to_torch(case.model())
