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

TASKS = ("classification", "reconstruction", "generic")
LIKELIHOODS = ("categorical", "bernoulli", "gaussian")


@dataclass(frozen=True)
class TaskGuess:
    task: str
    likelihood: str
    target_input: str | None
    reason: str


def infer_task(
    metadata: dict[str, str],
    inputs: dict[str, np.ndarray],
    output: np.ndarray,
    *,
    has_labels: bool,
    task: str | None = None,
    likelihood: str = "auto",
) -> TaskGuess:
    """Decide task, likelihood and reconstruction target from ``output`` (a batch of the chosen output)."""
    if task is not None and task not in TASKS:
        raise InvalidOptionError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    declared = metadata.get("task")
    if task is None and declared is not None and declared not in TASKS:
        log.warning("model metadata declares task=%r, which fls-compress does not know; using generic verification", declared)
        declared = None
    single = next(iter(inputs.values())) if len(inputs) == 1 else None
    reconstructs = (
        single is not None
        and single.dtype.kind == "f"
        and output.ndim >= 2
        and tuple(output.shape[1:]) == tuple(single.shape[1:])
    )
    classifier_shape = output.ndim == 2 and output.shape[1] > 1
    chosen_task = task or declared
    reason = "explicit" if task else ("metadata" if declared else "heuristic")
    if chosen_task is None:
        if reconstructs:
            chosen_task = "reconstruction"
        elif has_labels or classifier_shape:
            chosen_task = "classification"
        else:
            chosen_task = "generic"
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
    return TaskGuess(chosen_task, name, target, reason)
