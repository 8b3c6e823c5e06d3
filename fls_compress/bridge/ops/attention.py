"""Transformer operators of opset 23: ``Attention`` and ``RotaryEmbedding`` (ONNX operator specs).

Attention-23/24: scaled dot-product attention (Vaswani et al. 2017, eq. 1) with the spec's pattern

    scores = (Q * sqrt(scale)) @ (K * sqrt(scale))^T      scale default 1/sqrt(head_size)
    scores = softcap * tanh(scores / softcap)             when softcap > 0
    probs  = softmax(scores + bias)                       bias from attn_mask and is_causal
    Y      = probs @ V

* 3-D ``Q``/``K``/``V`` ``[batch, seq, heads*head_size]`` are split into ``q_num_heads`` /
  ``kv_num_heads`` heads; 4-D inputs are ``[batch, heads, seq, head_size]``.
* ``past_key``/``past_value`` are concatenated before ``K``/``V`` on the sequence axis (the
  ``present_*`` outputs).
* grouped-query / multi-query attention (Ainslie et al. 2023; Shazeer 2019): each KV head serves
  ``q_num_heads / kv_num_heads`` consecutive query heads.
* ``attn_mask``: boolean (True attends; False adds -inf) or additive float, broadcast to
  ``[batch, heads, q_seq, total_seq]``, padded with masked positions when shorter than ``total_seq``.
* ``is_causal``: query i attends key j iff ``j <= i + past_seq`` (bottom-right alignment).
* a query row with every key masked gives a zero row (the spec's errata), not NaN.
* ``qk_matmul_output`` modes: 0 raw ``QK^T``, 1 after softcap, 2 after the mask, 3 after softmax.

``softmax_precision`` may be float (1) or double (11); the bridge computes in float32, the lower
precisions are refused. Opset 24's ``nonpad_kv_seqlen`` input is refused.

RotaryEmbedding-23 (Su et al. 2021, RoFormer eq. 34): the spec's algorithm; the first
``rotary_embedding_dim`` features of each head (default all) are rotated pairwise, pairs being the
two halves (``interleaved=0``) or adjacent features (``interleaved=1``), by the angles whose cosine
and sine come from the caches (indexed by ``position_ids`` when given).
"""

from __future__ import annotations

import math

import torch
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode

from ._common import OnnxModule, attr, converter, present, result, spread


class OnnxAttention(OnnxModule):
    def __init__(self, flags: tuple[bool, ...], q_heads: int, kv_heads: int, scale: float | None, softcap: float,
                 is_causal: bool, qk_mode: int, outputs: int):
        super().__init__()
        self.flags, self.q_heads, self.kv_heads = flags, q_heads, kv_heads
        self.scale, self.softcap, self.is_causal, self.qk_mode, self.outputs = scale, softcap, is_causal, qk_mode, outputs

    @staticmethod
    def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
        b, s, hidden = x.shape
        return x.reshape(b, s, heads, hidden // heads).transpose(1, 2)

    def forward(self, *args: torch.Tensor):
        q, k, v, mask, past_k, past_v = spread(args, self.flags)
        three_d = q.dim() == 3
        if three_d:
            q, k, v = self._heads(q, self.q_heads), self._heads(k, self.kv_heads), self._heads(v, self.kv_heads)
        if past_k is not None:
            k = torch.cat([past_k, k], dim=2)
        if past_v is not None:
            v = torch.cat([past_v, v], dim=2)
        present_k, present_v = k, v
        q_seq, total = q.shape[2], k.shape[2]
        past = past_k.shape[2] if past_k is not None else 0
        bias = q.new_zeros(q_seq, total)
        if mask is not None:
            if mask.shape[-1] < total:  # shorter masks are padded with masked positions
                fill = torch.zeros if mask.dtype == torch.bool else lambda *s, **kw: torch.full(s, -math.inf, **kw)
                pad = fill(*mask.shape[:-1], total - mask.shape[-1], dtype=mask.dtype, device=mask.device)
                mask = torch.cat([mask, pad], dim=-1)
            if mask.dtype == torch.bool:
                mask = torch.where(mask, q.new_zeros(()), q.new_full((), -math.inf))
            bias = bias + mask.to(q.dtype)
        if self.is_causal:
            rows = torch.arange(q_seq, device=q.device).unsqueeze(1)
            cols = torch.arange(total, device=q.device).unsqueeze(0)
            bias = bias + torch.where(cols <= rows + past, q.new_zeros(()), q.new_full((), -math.inf))
        heads = q.shape[1]
        if k.shape[1] != heads:  # grouped / multi-query attention
            k = k.repeat_interleave(heads // k.shape[1], dim=1)
            v = v.repeat_interleave(heads // v.shape[1], dim=1)
        scale = self.scale if self.scale is not None else 1.0 / math.sqrt(q.shape[-1])
        root = math.sqrt(scale)
        scores = torch.matmul(q * root, (k * root).transpose(-1, -2))
        raw = scores
        if self.softcap > 0:
            scores = self.softcap * torch.tanh(scores / self.softcap)
        capped = scores
        scores = scores + bias
        masked_row = torch.isneginf(torch.amax(bias.expand_as(scores), dim=-1, keepdim=True))
        probs = torch.softmax(torch.where(masked_row, torch.zeros_like(scores), scores), dim=-1)
        probs = torch.where(masked_row, torch.zeros_like(probs), probs)
        y = torch.matmul(probs, v)
        if three_d:
            y = y.transpose(1, 2).reshape(y.shape[0], q_seq, -1)
        qk = (raw, capped, scores, probs)[self.qk_mode]
        produced = (y, present_k, present_v, qk)[: self.outputs]  # indexed by ONNX output position
        return produced if len(produced) > 1 else produced[0]


class OnnxRotaryEmbedding(OnnxModule):
    def __init__(self, has_positions: bool, interleaved: bool, rotary_dim: int, num_heads: int):
        super().__init__()
        self.has_positions, self.interleaved, self.rotary_dim, self.num_heads = has_positions, interleaved, rotary_dim, num_heads

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor | None = None):
        shape = x.shape
        if x.dim() == 4:  # [B, H, S, D] -> [B, S, H, D]
            x = x.transpose(1, 2)
        else:
            x = x.reshape(shape[0], shape[1], self.num_heads, shape[2] // self.num_heads)
        dim = self.rotary_dim or x.shape[-1]
        rotate, keep = x[..., :dim], x[..., dim:]
        if positions is not None:
            cos, sin = cos[positions.long()], sin[positions.long()]
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # [B, S, 1, dim/2]
        if self.interleaved:
            x1, x2 = rotate[..., 0::2], rotate[..., 1::2]
        else:
            x1, x2 = rotate[..., : dim // 2], rotate[..., dim // 2 :]
        real, imag = cos * x1 - sin * x2, sin * x1 + cos * x2
        if self.interleaved:
            rotated = torch.stack([real, imag], dim=-1).reshape(rotate.shape)
        else:
            rotated = torch.cat([real, imag], dim=-1)
        out = torch.cat([rotated, keep], dim=-1)
        return out.transpose(1, 2) if len(shape) == 4 else out.reshape(shape)


def _attention(node: OnnxNode, graph: OnnxGraph):
    names, flags = present(node, 7)
    if flags[6]:
        raise NotImplementedError("Attention with nonpad_kv_seqlen is not implemented")
    precision = attr(node, "softmax_precision", None)
    if precision not in (None, 0, 1, 11):
        raise NotImplementedError(f"Attention softmax_precision={precision} (below float32) is not implemented")
    scale = attr(node, "scale", None)
    module = OnnxAttention(
        flags[:6], int(attr(node, "q_num_heads", 0)), int(attr(node, "kv_num_heads", 0)),
        None if scale is None else float(scale), float(attr(node, "softcap", 0.0)), bool(attr(node, "is_causal", 0)),
        int(attr(node, "qk_matmul_output_mode", 0)), len(node.output_values),
    )
    return result(node, module, names)


converter("Attention", 23, 24)(_attention)


@converter("RotaryEmbedding", 23)
def _rotary(node: OnnxNode, graph: OnnxGraph):
    names, flags = present(node, 4)
    module = OnnxRotaryEmbedding(flags[3], bool(attr(node, "interleaved", 0)), int(attr(node, "rotary_embedding_dim", 0)),
                                 int(attr(node, "num_heads", 0)))
    return result(node, module, names)
