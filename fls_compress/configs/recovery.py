"""Knobs of recovery: gradual pruning on a sparsity schedule with distillation fine-tuning in between.

Declared once here and mixed into :class:`~fls_compress.configs.pruning.CurvatureConfig`, so the
methods with a torch graph (fls, obert, ief, mfac) accept them, and into
:class:`~fls_compress.configs.pruning.Structured` (magnitude and sparsegpt with ``--structure``: one
prune, then distillation of the smaller graph); every other method refuses them (exit 2). Everything is
off unless ``--recover-steps`` is given; the other ``--recover-*`` options without it are refused, never
ignored. The handlers are :mod:`fls_compress.recovery.gradual` and :mod:`fls_compress.recovery.structured`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

from ..errors import InvalidOptionError
from .base import Config, knob

RECOVER_SCHEDULES = ("cubic", "linear")
DEFAULT_RECOVER_ITERS = 100
DEFAULT_RECOVER_FINAL_ITERS = 400
DEFAULT_RECOVER_LR = 1e-3
DEFAULT_RECOVER_BATCH = 64
DEFAULT_RECOVER_HOLDOUT = 0.1


@dataclass(frozen=True)
class Recovery(Config):
    """Gradual pruning (Zhu & Gupta 2017) with distillation from the dense model (Hinton et al. 2015)."""

    panel: ClassVar[str] = "Recovery (fls, obert, ief, mfac; magnitude, sparsegpt with --structure)"

    recover_steps: int | None = knob(
        None, "Gradual pruning: N pruning steps on the sparsity schedule (each the method's OBS step, FishLeg's Q refitted "
        "warm in between), each followed by fine-tuning that distils the dense model's outputs into the pruned one "
        "(masks fixed). Off by default (one-shot). With --structure (magnitude, sparsegpt): the structured prune in N "
        "steps on the same schedule (fractions of the original groups), the smaller graph distilled after each.",
        min=1, max=1000)
    recover_schedule: str | None = knob(
        None, "Sparsity schedule of --recover-steps: cubic (Zhu & Gupta 2017, eq. 1; default) or linear.",
        choices=RECOVER_SCHEDULES)
    recover_iters: int | None = knob(
        None, f"Adam steps of distillation after each pruning step but the last (default {DEFAULT_RECOVER_ITERS}; 0: gradual "
        "pruning without fine-tuning).", min=0, max=10_000_000)
    recover_final_iters: int | None = knob(
        None, f"Adam steps of distillation after the last pruning step (default {DEFAULT_RECOVER_FINAL_ITERS}); each phase "
        "stops early when the held-out distillation loss stops improving.", min=0, max=10_000_000)
    recover_lr: float | None = knob(None, f"Adam learning rate of the distillation fine-tuning (default {DEFAULT_RECOVER_LR:g}).",
                                    min=0.0, min_open=True, max=10.0)
    recover_batch_size: int | None = knob(None, f"Samples per fine-tuning step (default {DEFAULT_RECOVER_BATCH}).",
                                          min=1, max=1_000_000)
    recover_data: str | None = knob(
        None, "Extra unlabelled inputs for distillation (.npz/.npy/directory, the --data format), added to the calibration "
        "inputs; never read for anything else.")
    recover_holdout: float | None = knob(
        None, f"Fraction of the distillation inputs held out for early stopping (seeded; default {DEFAULT_RECOVER_HOLDOUT}).",
        min=0.0, min_open=True, max=0.5)
    recover_label_weight: float | None = knob(
        None, "Weight a of the true-target NLL in (1 - a) KL(dense || pruned) + a NLL (default 0: distillation only). Needs "
        "targets for every distillation input: class labels, or the input itself for a reconstruction model.",
        min=0.0, max=1.0)

    def validate(self) -> None:
        super().validate()
        if self.recover_steps is None:
            given = [f.name for f in fields(Recovery) if f.name != "recover_steps" and getattr(self, f.name) is not None]
            if given:
                flag = "--" + given[0].replace("_", "-")
                raise InvalidOptionError(f"{flag} needs --recover-steps (recovery is off without it)")
        elif self.recover_steps == 1:
            between = [flag for flag, value in (("--recover-iters", self.recover_iters),
                                                ("--recover-schedule", self.recover_schedule)) if value is not None]
            if between:
                raise InvalidOptionError(f"{between[0]} sets the steps between gradual prunes (--recover-steps > 1); with "
                                         "--recover-steps 1 the one fine-tuning phase takes --recover-final-iters")

    @property
    def recovering(self) -> bool:
        return self.recover_steps is not None

    @property
    def recovery_settings(self) -> dict:
        """Every recovery value explicit (defaults filled in), for the handler and the report."""
        def pick(value, default):
            return default if value is None else value

        return {
            "steps": self.recover_steps, "schedule": pick(self.recover_schedule, "cubic"),
            "iters": pick(self.recover_iters, DEFAULT_RECOVER_ITERS),
            "final_iters": pick(self.recover_final_iters, DEFAULT_RECOVER_FINAL_ITERS),
            "lr": pick(self.recover_lr, DEFAULT_RECOVER_LR), "batch_size": pick(self.recover_batch_size, DEFAULT_RECOVER_BATCH),
            "data": self.recover_data, "holdout": pick(self.recover_holdout, DEFAULT_RECOVER_HOLDOUT),
            "label_weight": pick(self.recover_label_weight, 0.0),
        }
