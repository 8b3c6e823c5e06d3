"""What a model does, decided once: the task verification reports on and the likelihood that defines the Fisher.

One function, :func:`infer_task`, serves both pruning (which likelihood, which input is the target) and
verification (which task metrics to report), so the two can never disagree. Precedence:

1. explicit choices (``--likelihood``, ``--task``);
2. the model's ``metadata_props``: ``likelihood`` in {categorical, bernoulli, gaussian} and ``task`` in
   :data:`TASKS`; any other ``task`` value (e.g. Ultralytics' ``detect``) is noted with a warning and
   treated as generic (metadata from other tools never aborts a run);
3. the data: a single float input whose shape the output reproduces is a reconstruction model
   (Bernoulli likelihood for inputs in [0, 1], Gaussian otherwise, target = the input); labels in the
   data or an ``[N, C > 1]`` output make a classifier (categorical likelihood, labels sampled from the
   model when the data has none); anything else is generic with a Gaussian likelihood.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .errors import InvalidOptionError

log = logging.getLogger(__name__)

TASKS = ("classification", "reconstruction", "detection", "generic")
DETECT_TASKS = frozenset({"detect", "detection"})
LIKELIHOODS = ("categorical", "bernoulli", "gaussian")


@dataclass(frozen=True)
class TaskGuess:
    task: str
    likelihood: str
    target_input: str | None
    reason: str
    fallback: dict[str, str] | None = None


def reproduces_input(inputs: dict[str, np.ndarray], output: np.ndarray) -> bool:
    """A single float input whose per-sample shape the output has (an autoencoder's reconstruction)."""
    single = next(iter(inputs.values())) if len(inputs) == 1 else None
    return (single is not None and single.dtype.kind == "f" and output.ndim >= 2
            and tuple(output.shape[1:]) == tuple(single.shape[1:]))


def resolve_task(
    task: str | None, metadata: dict[str, str], output_shapes: list[tuple[int, ...]], *,
    reconstructs: bool, has_labels: bool,
) -> tuple[str, str, dict[str, str] | None]:
    """(task, reason, fallback record): explicit, then declared (``detect`` -> detection; unknown ->
    generic with a warning and a fallback record), then the data heuristic."""
    declared = metadata.get("task")
    if task is not None and task not in TASKS and task != declared:
        raise InvalidOptionError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    wanted = task if task is not None else declared
    if wanted:
        reason = "explicit" if task is not None else "metadata"
        if wanted in DETECT_TASKS:
            return "detection", reason, None
        if wanted in TASKS:
            return wanted, reason, None
        log.warning("model metadata declares task=%r, which fls-compress does not know; using generic verification", wanted)
        return "generic", "fallback", {"declared": wanted, "used": "generic", "reason": "unknown task in model metadata"}
    if reconstructs:
        return "reconstruction", "heuristic: the output reproduces the input's shape", None
    if has_labels or any(len(s) == 2 and s[1] > 1 for s in output_shapes):
        return "classification", "heuristic: labels or [N, C] logits", None
    return "generic", "heuristic", None


def infer_task(
    metadata: dict[str, str],
    inputs: dict[str, np.ndarray],
    output: np.ndarray,
    *,
    has_labels: bool,
    task: str | None = None,
    likelihood: str = "auto",
) -> TaskGuess:
    """Task (via :func:`resolve_task`), likelihood and reconstruction target for the chosen ``output``."""
    reconstructs = reproduces_input(inputs, output)
    classifier_shape = output.ndim == 2 and output.shape[1] > 1
    chosen_task, reason, fallback = resolve_task(task, metadata, [tuple(output.shape)], reconstructs=reconstructs,
                                                 has_labels=has_labels)
    single = next(iter(inputs.values())) if len(inputs) == 1 else None
    target = next(iter(inputs)) if (chosen_task == "reconstruction" and reconstructs) else None
    name = likelihood
    if name == "auto":
        meta_lik = metadata.get("likelihood")
        if meta_lik in LIKELIHOODS:
            name = meta_lik
        elif chosen_task == "classification" and classifier_shape:
            name = "categorical"
        elif target is not None:
            name = "bernoulli" if float(single.min()) >= 0.0 and float(single.max()) <= 1.0 else "gaussian"  # type: ignore[union-attr]
        else:
            name = "gaussian"
    elif name not in LIKELIHOODS:
        raise InvalidOptionError(f"unknown likelihood {name!r}; choose one of auto, {', '.join(LIKELIHOODS)}")
    if name == "categorical" and not classifier_shape:
        raise InvalidOptionError(f"categorical likelihood needs class logits [N, C]; the output has shape {tuple(output.shape)}")
    if name == "categorical":
        target = None  # class labels come from the data (or are sampled), never from an input
    return TaskGuess(chosen_task, name, target, reason, fallback)
