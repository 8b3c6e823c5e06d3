"""FishLeg: an amortised, learned inverse Fisher Q(lambda) (Garcia, Sutton, Lim, Nickl, ICLR 2023),
used as the curvature of the FishLeg Surgeon (FLS; McGowan et al., arXiv 2412.02328).

Auxiliary loss (Garcia et al. 2023, eq. 8). For probes u, FishLeg minimises over lambda

    A(lambda; u) = 1/2 u^T Q F_gamma Q u - u^T Q u,      F_gamma = F + gamma I,

whose minimiser (for E[u u^T] > 0) is Q = F_gamma^{-1}: completing the square gives
A = 1/2 ||Q u - F_gamma^{-1} u||^2_{F_gamma} - const. With Gaussian probes u ~ N(0, I) and a
layer-block-diagonal Q, each block targets (F_ll + gamma I)^{-1}.

Gradient: with v = Q u and r = F_gamma v - u, grad_lambda A = J_lambda^T r (Garcia et al. 2023, eq. 9),
the gradient of the surrogate <c, Q(lambda) u> with c = r held fixed; the preconditioned variant
(McGowan et al. 2024, Alg. 1, "one extra product") uses c = Q r, which makes every error mode decay at
the same rate near the optimum. Both Q forms give this gradient in closed form
(:mod:`.qforms`), layers are packed into batched modules (:mod:`.qgroups`), and one fused Adam step
updates every auxiliary parameter (the loop, with its validation checkpoints, is :mod:`.fishleg_fit`). F v is the exact GGN product of :meth:`FisherProblem.fisher_vps`
(one forward pass shared by all probes), so unlabelled data suffices.

Forms (:mod:`.qforms`): ``"kron"`` Q = D_A (R^T R kron L L^T) D_A; ``"ekfac"`` the same with a learned
inner diagonal B between the factors (EKFAC-style, George et al. 2018); ``"block"`` block-diagonal.

Initialisation: ``"identity"`` gives Q0 = I / gamma (Garcia et al. 2023); ``"diag"`` gives
Q0 = diag(1 / (diag F + gamma)) from per-example sampled-label gradients; ``"kfac"`` (default, Kronecker
forms) uses the Kronecker factors E[G G^T], E[G^T G] of the per-example gradients G (:mod:`.kfac`): for
``kron`` R^T R and L L^T are their separately damped inverses (factored damping, Martens & Grosse 2015,
section 6.3); for ``ekfac`` Q0 is the *exact* damped inverse (G kron X + gamma I)^{-1} in the factors'
eigenbasis. The fit starts there and corrects it.

OBS group update (:mod:`.fishleg_obs`): ``update="sweep"`` (default), ``"row-exact"`` (reference, layers
up to ``row_exact_max_in`` inputs; wider ones are refused), ``"decoupled"`` (-Q z) or, for the block
form, ``"block-exact"``. What each layer used is recorded in :attr:`FishLegEstimator.layer_info`.
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch

from ..configs.pruning import DEFAULT_FIT_STEPS, DEFAULT_REFIT_STEPS, auto_steps
from ..errors import InvalidOptionError
from . import fishleg_obs
from .base import FitStats, InverseFisherEstimator
from .fishleg_config import FishLegConfig, UPDATES  # noqa: F401  (re-exported)
from .fishleg_fit import CHECK_EVERY, MAX_CHECKS, FitLoop  # noqa: F401  (re-exported: the fit loop lives in fishleg_fit.py)
from .kfac import GradientMoments, exact_damped_eigenbasis, factored_damped_inverse, gradient_moments
from .problem import FisherProblem
from .qforms import BlockQ, KroneckerQ  # noqa: F401  (re-exported: the Q forms live in qforms.py)
from .qgroups import BlockGroup, KronGroup

log = logging.getLogger(__name__)


class FishLegEstimator(FitLoop, InverseFisherEstimator):
    """Learned block-diagonal inverse Fisher; refits warm-start from the current lambda.

    ``layer_info[name]`` records, per prunable weight: ``update`` (sweep / row-exact / decoupled /
    block-exact), ``in``, ``out``, ``form``; ``block`` (block form); ``requested`` (block form asked for
    an update only the Kronecker form has); ``sweep_loss`` (sum over pruning steps of the sweep's OBS loss
    estimate, in units of each row's H); ``cholesky_jitter`` (if L L^T needed a diagonal shift).
    """

    name = "fls"

    def __init__(self, config: FishLegConfig | None = None):
        self.config = config or FishLegConfig()
        self.config.validate()
        self.groups: list[KronGroup | BlockGroup] = []
        self.group_of: dict[str, KronGroup | BlockGroup] = {}
        self.gamma: float = float("nan")
        self.layer_info: dict[str, dict] = {}
        self._problem: FisherProblem | None = None
        self._upper: dict[str, tuple[torch.Tensor, float]] = {}

    # ---------------------------------------------------------------- construction
    def _choose_update(self, problem: FisherProblem) -> None:
        """Fix and record the group update of every layer; refuse row-exact on too wide layers."""
        cfg = self.config
        for n, w in problem.weights.items():
            out_f, in_f = w.matrix_shape
            info: dict = {"in": in_f, "out": out_f, "form": cfg.form}
            if cfg.form == "block":
                info["update"] = "decoupled" if cfg.update == "decoupled" else "block-exact"
                info["block"] = cfg.block_size
                if cfg.update in ("sweep", "row-exact"):
                    info["requested"] = cfg.update
            elif cfg.update == "auto":
                # exact per-row group OBS where one dense solve per row is affordable, the column sweep above
                info["update"] = "row-exact" if in_f <= cfg.row_exact_max_in else "sweep"
                info["policy"] = f"auto: row-exact up to {cfg.row_exact_max_in} inputs, sweep above"
            else:
                if cfg.update == "row-exact" and in_f > cfg.row_exact_max_in:
                    raise InvalidOptionError(
                        f"row-exact OBS update refused for {n} ({in_f} inputs > {cfg.row_exact_max_in}: one dense "
                        "solve per row); use the sweep update"
                    )
                info["update"] = cfg.update
            self.layer_info[n] = info
        if cfg.form == "block" and cfg.update in ("sweep", "row-exact"):
            log.warning("FishLeg block form: %r is defined for the Kronecker form; using the exact group OBS inside each block", cfg.update)
        swept = [n for n, i in self.layer_info.items() if i.get("policy") and i["update"] == "sweep"]
        if swept:
            log.warning("OBS update: %d layer(s) wider than %d inputs use the column sweep, which compensates only the "
                        "columns after each removed weight (per layer in method_info.per_layer): %s",
                        len(swept), cfg.row_exact_max_in, ", ".join(swept[:5]) + (" ..." if len(swept) > 5 else ""))

    def _build(self, problem: FisherProblem) -> FitStats:
        cfg = self.config
        stats = FitStats()
        t0 = time.perf_counter()
        if not self.layer_info:  # a restart keeps the per-layer record (and its accumulated sweep loss)
            self._choose_update(problem)
        moments: GradientMoments | None = None
        if cfg.init != "identity" or cfg.damping is None:
            moments = gradient_moments(problem, cfg.diag_samples, kronecker=cfg.init == "kfac" and cfg.form != "block")
            stats.samples += min(cfg.diag_samples, problem.num_samples)
            stats.extra["per_example"] = 1.0 if problem.per_example_info.get("per_example") == "hooks" else 0.0
        if cfg.damping is not None:
            self.gamma = float(cfg.damping)
        else:
            total = sum(float(d.sum()) for d in moments.diag.values())  # type: ignore[union-attr]
            count = sum(d.numel() for d in moments.diag.values())  # type: ignore[union-attr]
            self.gamma = max(cfg.relative_damping * total / max(count, 1), 1e-12)
        a0: dict[str, torch.Tensor] = {}
        for n, w in problem.weights.items():
            # Q lives on its weight's device, in at least single precision
            opts = {"dtype": torch.promote_types(w.parameter.dtype, torch.float32), "device": w.parameter.device}
            if cfg.init == "diag" or (cfg.init == "kfac" and cfg.form == "block"):
                a0[n] = (w.to_matrix(moments.diag[n]) + self.gamma).rsqrt()  # type: ignore[union-attr]
            elif cfg.init == "kfac":  # kron / ekfac: the factors carry the scale
                a0[n] = torch.ones(w.matrix_shape, **opts)
            else:
                a0[n] = torch.full(w.matrix_shape, self.gamma**-0.5, **opts)
            a0[n] = a0[n].to(**opts).contiguous()
        self.groups = []
        if cfg.form != "block":
            by_shape: dict[tuple[int, int], list[str]] = {}
            for n, w in problem.weights.items():
                by_shape.setdefault(w.matrix_shape, []).append(n)
            self.groups = [KronGroup(names, a0, inner=cfg.form == "ekfac") for names in by_shape.values()]
        else:
            self.groups = [BlockGroup(problem.names, a0, cfg.block_size)]
        self.group_of = {n: g for g in self.groups for n in g.names}
        if cfg.form != "block" and cfg.init == "kfac":
            for n in problem.names:
                self._kfac_init(n, moments.left[n], moments.right[n], moments.sq_norm[n])  # type: ignore[union-attr]
        stats.seconds = time.perf_counter() - t0
        stats.extra["gamma"] = self.gamma
        stats.extra["aux_floats"] = float(sum(sum(p.numel() for p in g.params) for g in self.groups))
        return stats

    def _kfac_init(self, name: str, left: torch.Tensor, right: torch.Tensor, sq_norm: float) -> None:
        """kron: R^T R, L L^T from the factored damping; ekfac: the exact damped inverse (see :mod:`.kfac`)."""
        group = self.group_of[name]
        if self.config.form == "ekfac":
            group.set_factors(name, *exact_damped_eigenbasis(left, right, sq_norm, self.gamma))  # type: ignore[union-attr]
        else:
            group.set_factors(name, *factored_damped_inverse(left, right, sq_norm, self.gamma))  # type: ignore[union-attr]

    # ---------------------------------------------------------------- products
    def _mmask(self, problem: FisherProblem) -> dict[str, torch.Tensor]:
        """Masks as matrix views in the dtype of each layer's Q."""
        return {n: w.to_matrix(problem.masks[n]).to(self.group_of[n].params[0].dtype) for n, w in problem.weights.items()}

    def _apply_all(self, u: dict[str, torch.Tensor], mmask: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list]:
        """v = Q u for every layer (matrix views with a probe dimension), masked, in the masks' dtype; plus the
        caches (in an aux step the Kronecker groups compute in their :meth:`~.qforms.KroneckerQ.held` dtype)."""
        v: dict[str, torch.Tensor] = {}
        caches = []
        for g in self.groups:
            out, cache = g.q.products(g.pack(u))
            caches.append(cache)
            v.update(g.unpack(out))
        return {n: x.to(mmask[n].dtype) * mmask[n] for n, x in v.items()}, caches

    def _product_dtype(self, backend: str | None) -> torch.dtype | None:
        """bfloat16 when the fit's fast arithmetic is oneDNN's bf16 and Q has a Kronecker group: its products
        then run on bf16 copies of the probes and factors (about 2x the bf16-arithmetic float32 matmuls on the
        autoencoder), while lambda, Adam's state, r = F_gamma v - u and the Fisher products stay float32."""
        return torch.bfloat16 if backend == "bf16" and any(g.kind == "kron" for g in self.groups) else None

    def diag(self, name: str) -> torch.Tensor:
        w = self._problem.weights[name]  # type: ignore[union-attr]
        with torch.no_grad():
            d = w.from_matrix(self.group_of[name].diag_one(name))
        return d.clamp_min(self.config.clamp * float(d.max().clamp_min(1e-30)))

    def matvec(self, name: str, z: torch.Tensor) -> torch.Tensor:
        problem = self._problem
        w = problem.weights[name]  # type: ignore[union-attr]
        group = self.group_of[name]
        with torch.no_grad():
            out = group.apply_one(name, w.to_matrix(z.to(group.params[0].dtype)))
        return w.from_matrix(out).to(z.dtype) * problem.masks[name]  # type: ignore[union-attr]

    def block_exact_update(self, name: str, weight: torch.Tensor, prune: torch.Tensor) -> torch.Tensor | None:
        """The group OBS update recorded for this layer (see :mod:`.fishleg_obs`); ``None`` = decoupled."""
        problem = self._problem
        assert problem is not None
        info = self.layer_info[name]
        if info["update"] == "decoupled":
            return None
        w = problem.weights[name]
        theta = w.to_matrix(weight)
        new = w.to_matrix(prune)
        gone = w.to_matrix(~problem.masks[name]) | new
        group = self.group_of[name]
        if info["update"] == "block-exact":
            delta = fishleg_obs.block_exact_update(theta.reshape(-1), new.reshape(-1), gone.reshape(-1), group.blocks_of(name))  # type: ignore[union-attr]
            delta = delta.reshape(theta.shape)
        elif info["update"] == "row-exact":
            _, L, A = group.member(name)  # type: ignore[union-attr]
            delta = fishleg_obs.kron_row_exact_update(theta, new, gone, L, A, group.row_inner(name))  # type: ignore[union-attr]
        else:
            _, L, A = group.member(name)  # type: ignore[union-attr]
            upper, jitter = self._sweep_upper(name)
            rows = new.any(1)
            delta = torch.zeros_like(theta, dtype=torch.float64)
            if bool(rows.any()):
                new_rows, loss = fishleg_obs.kron_sweep_update(theta[rows], gone[rows], upper, A[rows], self.config.sweep_block)
                delta[rows] = new_rows - theta[rows].double()
                info["sweep_loss"] = info.get("sweep_loss", 0.0) + float(loss.sum())
            if jitter > 0 and "cholesky_jitter" not in info:
                log.warning("FLS sweep: L L^T of %s factorised only with a diagonal jitter %.3g", name, jitter)
                info["cholesky_jitter"] = jitter
        return w.from_matrix(delta.to(weight.dtype))

    def sweep_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, row_scale) for the OBS column sweep of ``name`` (Kronecker form): U upper-triangular with
        U^T U = L L^T, row r scaled by A_r, i.e. H_r^{-1} = D_{A_r} L L^T D_{A_r} (used by quantization)."""
        if self.config.form == "block":
            raise InvalidOptionError("the OBS sweep needs a Kronecker form of Q (--q-form kron or ekfac)")
        _, L, A = self.group_of[name].member(name)  # type: ignore[union-attr]
        return self._sweep_upper(name)[0], A.detach().double()

    def _sweep_upper(self, name: str) -> tuple[torch.Tensor, float]:
        """Cached Cholesky factor of the sweep's shared H^{-1}; with an inner diagonal, its row mean is used
        (rows differ there; recorded as ``layer_info[name]["inner"] = "row-mean"``)."""
        if name not in self._upper:
            group = self.group_of[name]
            _, L, _ = group.member(name)  # type: ignore[union-attr]
            c = group.row_inner(name)  # type: ignore[union-attr]
            if c is not None:
                self.layer_info[name]["inner"] = "row-mean"
                log.warning("FLS sweep on %s: Q's rows differ (inner diagonal); the sweep uses their mean "
                            "(method_info.per_layer inner=row-mean)", name)
            self._upper[name] = fishleg_obs.kron_upper_factor(L, None if c is None else c.mean(0))
        return self._upper[name]

    # ---------------------------------------------------------------- fitting
    def aux_step(self, problem: FisherProblem, optimizer: torch.optim.Optimizer, mmask: dict[str, torch.Tensor] | None = None,
                 dtype: torch.dtype | None = None) -> float:
        """One auxiliary-loss step (FLS Algorithm 1). Returns the normalised auxiliary loss A/||u||^2.
        ``dtype``: the Kronecker groups' Q products run on copies in that dtype (:meth:`_product_dtype`)."""
        cfg = self.config
        mmask = mmask if mmask is not None else self._mmask(problem)
        batch = problem.next_batch(cfg.aux_batch)
        P = cfg.probes
        u = {n: torch.randn((P, *m.shape), generator=problem.generator).to(m.device) * m for n, m in mmask.items()}
        with contextlib.ExitStack() as held:
            for g in self.groups:
                if g.kind == "kron":
                    held.enter_context(g.q.held(dtype))  # type: ignore[union-attr]
            loss = self._set_aux_grads(problem, mmask, batch, u)
        optimizer.step()
        return loss

    def _set_aux_grads(self, problem: FisherProblem, mmask: dict[str, torch.Tensor], batch, u: dict[str, torch.Tensor]) -> float:
        """v = Q u, F_gamma v, r and the closed-form gradient into every auxiliary parameter's ``.grad``;
        returns A / ||u||^2."""
        cfg = self.config
        P = cfg.probes
        with torch.no_grad():
            v, caches = self._apply_all(u, mmask)
        weights = problem.weights
        fvs = problem.fisher_vps(batch, [{n: weights[n].from_matrix(v[n][p]) for n in v} for p in range(P)])
        with torch.no_grad():
            norm = sum(float((x**2).sum()) for x in u.values())
            r, aux = {}, 0.0
            for n in v:
                fv = torch.stack([weights[n].to_matrix(f[n]) for f in fvs])
                h = fv + self.gamma * v[n]
                r[n] = h - u[n]
                aux += float(0.5 * (v[n] * h).sum() - (u[n] * v[n]).sum())
            c = self._apply_all(r, mmask)[0] if cfg.precondition else r
            for g, cache in zip(self.groups, caches):
                outs = [p.grad if p.grad is not None and p.grad.shape == p.shape else None for p in g.params]
                grads = g.q.surrogate_grads(g.pack(u), g.pack(c), cache, scale=1.0 / norm, out=outs)
                for p, gr in zip(g.params, grads):
                    p.grad = gr  # written in place for the big block factors (no B-sized temporaries)
        return aux / norm

    def steps_for(self, problem: FisherProblem) -> tuple[int, int]:
        """(fit, refit) steps: the configured ones, or the defaults scaled by :func:`auto_steps`."""
        weights = problem.num_weights
        fit = self.config.fit_steps if self.config.fit_steps is not None else auto_steps(DEFAULT_FIT_STEPS, weights, DEFAULT_FIT_STEPS // 2)
        refit = (self.config.refit_steps if self.config.refit_steps is not None
                 else auto_steps(DEFAULT_REFIT_STEPS, weights, DEFAULT_REFIT_STEPS // 2))
        return fit, refit

    def fit(self, problem: FisherProblem) -> FitStats:
        self._problem = problem
        stats = self._build(problem)
        fit, refit = self.steps_for(problem)
        stats.extra["planned_fit_steps"], stats.extra["planned_refit_steps"] = float(fit), float(refit)
        if self.config.fit_steps is None or self.config.refit_steps is None:
            default = (DEFAULT_FIT_STEPS, DEFAULT_REFIT_STEPS)
            weights = problem.num_weights
            if (self.config.fit_steps is None and fit == 0) or (self.config.refit_steps is None and refit == 0):
                log.warning("FishLeg fit skipped by the default budget (%d / %d steps for %d prunable weights: a budget under "
                            "half the converged one does not pay); Q stays at its start. --fit-steps / --refit-steps force a "
                            "fit (method_info.fit_skipped)", fit, refit, weights)
                stats.extra["fit_skipped"] = 1.0
            elif (fit, refit) != default:
                log.info("FishLeg fit budget: %d / %d steps (defaults %d / %d scaled to %d prunable weights)", fit, refit, *default, weights)
        return self._optimise(problem, fit, stats)

    def refit(self, problem: FisherProblem) -> FitStats:
        """Progressive assimilation (``refit_mode="warm"``): continue the lambda optimisation on the masked
        model. ``"restart"``: rebuild Q's start from the masked model's gradient moments (and gamma), as
        oBERT re-estimates its Fisher at every step, then run the refit steps from there."""
        if not self.groups:
            return self.fit(problem)
        self._problem = problem
        stats = self._build(problem) if self.config.refit_mode == "restart" else FitStats()
        return self._optimise(problem, self.steps_for(problem)[1], stats)

    def dense_block(self, name: str) -> torch.Tensor:
        """Explicit Q_l as a matrix over the parameter's row-major flattening (tests; small layers only)."""
        w = self._problem.weights[name]  # type: ignore[union-attr]
        eye = torch.eye(w.numel, dtype=w.parameter.dtype, device=w.parameter.device)
        cols = [self.matvec(name, eye[i].reshape(w.parameter.shape)).reshape(-1) for i in range(w.numel)]
        return torch.stack(cols, 1)
