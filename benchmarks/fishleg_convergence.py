"""How fast the FishLeg fit reaches the exact damped inverse Fisher, vs fit steps, learning rate and wall time.

FishLeg (Garcia et al., ICLR 2023) learns Q(lambda) ~ (F + gamma I)^{-1} by minimising its auxiliary
loss. On tanh MLPs small enough for the exact per-layer Fisher blocks F_ll (``FisherProblem.dense_fisher``),
the metric is the per-layer relative error ||Q_l - (F_ll + gamma I)^{-1}||_F / ||(F_ll + gamma I)^{-1}||_F,
averaged over layers. gamma = 0.1 x mean diag F (the default relative damping), computed from the exact
Fisher. Every fit is fresh (the learning-rate schedule decays linearly over the fit's own steps).

Transfer check: on the 784-300-50-10 MNIST MLP of ``benchmarks/curvature_cost.py`` (exact inverse
unaffordable) the fit is judged by its validation auxiliary loss A(lambda) on held-out probes (lower is
better; a fit that does not lower it is reverted by the estimator).

Selection protocol (validation only): the learning rate is the one with the lowest validation-seed
error among those whose fit is *not* reverted on the MNIST MLP; the step count is the fewest steps
within 10% of the best error at that learning rate. The *test* seeds then report the chosen setting,
the same with 4 probes per Fisher product, and the previous default (lr 3e-3, 50 steps).

    python benchmarks/fishleg_convergence.py --out benchmarks/results [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fls_compress.configs.pruning import DEFAULT_FIT_STEPS  # noqa: E402
from fls_compress.curvature.fishleg import FishLegConfig, FishLegEstimator  # noqa: E402
from fls_compress.curvature.likelihoods import make_likelihood  # noqa: E402
from fls_compress.curvature.problem import problem_from_module  # noqa: E402

SIZES = (12, 10, 6)
VALIDATION_SEEDS = (0, 1)
TEST_SEEDS = (2, 3)
FORMS = {
    "kron (kfac init)": {"form": "kron", "init": "kfac"},
    "block-50 (diag init)": {"form": "block", "init": "diag", "block_size": 50},
    # Kronecker factors + learned inner diagonal, started at the exact damped inverse of the K-FAC product
    "ekfac (exact K-FAC init)": {"form": "ekfac", "init": "kfac"},
}
LRS = (3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
STEPS = (0, 25, 50, 100, 200, 400, 800, 1600)
OLD_DEFAULT = (3e-3, 50)


def make_problem(seed: int, n: int = 512, sizes: tuple[int, ...] = SIZES, batch_size: int = 128):
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(torch.nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(torch.nn.Tanh())
    net = torch.nn.Sequential(*layers)
    x = np.random.default_rng(seed).normal(size=(n, sizes[0])).astype(np.float32)
    with torch.no_grad():
        labels = net(torch.from_numpy(x)).argmax(-1).numpy()
    return problem_from_module(net, x, make_likelihood("categorical"), labels=labels, batch_size=batch_size, seed=seed)


# The model of the issue that asked for a converging fit (and of tests/test_fishleg.py): 6-5-4 tanh MLP,
# 256 Gaussian inputs, absolute damping 0.05; every other setting is the library default.
DEFAULT_CURVE = {"sizes": (6, 5, 4), "n": 256, "batch_size": 64, "gamma": 0.05, "steps": (0, 25, 50, 100, 200, 400, 800),
                 "seeds": (0, 1, 2)}


def default_curve() -> list[dict]:
    """Q's per-layer error to the exact damped inverse vs fit steps, library defaults, 1 thread, per seed
    (seed 0 is the tests' model; seeds 1, 2 re-draw the model and data)."""
    torch.set_num_threads(1)
    c = DEFAULT_CURVE
    rows = []
    for seed in c["seeds"]:
        problem = make_problem(seed, c["n"], c["sizes"], c["batch_size"])
        fisher, gamma = problem.dense_fisher(), c["gamma"]
        targets, off = {}, 0
        for name, w in problem.weights.items():
            k = w.numel
            targets[name] = torch.linalg.inv(fisher[off : off + k, off : off + k] + gamma * torch.eye(k, dtype=torch.float64))
            off += k
        for steps in c["steps"]:
            problem = make_problem(seed, c["n"], c["sizes"], c["batch_size"])
            est = FishLegEstimator(FishLegConfig(damping=gamma, fit_steps=steps))
            t0 = time.perf_counter()
            est.fit(problem)
            seconds = time.perf_counter() - t0
            errs = [float(torch.linalg.norm(est.dense_block(n).double() - t) / torch.linalg.norm(t)) for n, t in targets.items()]
            rows.append({"seed": seed, "steps": steps, "errors": errs, "mean": float(np.mean(errs)), "seconds": seconds})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def render_default_curve(rows: list[dict]) -> str:
    c = DEFAULT_CURVE
    lines = [f"### Library defaults on the {'-'.join(map(str, c['sizes']))} MLP (absolute damping {c['gamma']})", "",
             f"Kronecker form, K-FAC start, lr {FishLegConfig().lr:g}; the default budget is {DEFAULT_FIT_STEPS} steps. "
             f"Relative error of each layer's Q; seed 0 is the model of `tests/test_fishleg.py`, the last columns average "
             f"seeds {list(c['seeds'])}.", "",
             "| steps | seed 0: layer 1 | seed 0: layer 2 | seed 0: mean | all seeds: layer 1 | all seeds: mean | seconds |",
             "|---|---|---|---|---|---|---|"]
    for steps in c["steps"]:
        at = [r for r in rows if r["steps"] == steps]
        s0 = next(r for r in at if r["seed"] == c["seeds"][0])
        mark = " (default)" if steps == DEFAULT_FIT_STEPS else ""
        lines.append(f"| {steps}{mark} | {s0['errors'][0]:.3f} | {s0['errors'][1]:.3f} | {s0['mean']:.3f} | "
                     f"{np.mean([r['errors'][0] for r in at]):.3f} | {np.mean([r['mean'] for r in at]):.3f} | "
                     f"{np.mean([r['seconds'] for r in at]):.2f} |")
    return "\n".join(lines + [""])


def exact_targets(seed: int) -> tuple[float, dict[str, torch.Tensor]]:
    problem = make_problem(seed)
    fisher = problem.dense_fisher()
    gamma = 0.1 * float(torch.diagonal(fisher).mean())
    targets, off = {}, 0
    for name, w in problem.weights.items():
        k = w.numel
        targets[name] = torch.linalg.inv(fisher[off : off + k, off : off + k] + gamma * torch.eye(k, dtype=torch.float64))
        off += k
    return gamma, targets


def q_error(form: dict, lr: float, steps: int, seed: int, gamma: float, targets: dict, probes: int = 1) -> dict:
    torch.set_num_threads(1)
    problem = make_problem(seed)
    est = FishLegEstimator(FishLegConfig(damping=gamma, lr=lr, fit_steps=steps, probes=probes, diag_samples=256, **form))
    t0 = time.perf_counter()
    stats = est.fit(problem)
    seconds = time.perf_counter() - t0
    errs = [float(torch.linalg.norm(est.dense_block(n).double() - t) / torch.linalg.norm(t)) for n, t in targets.items()]
    return {"error": float(np.mean(errs)), "seconds": seconds, "reverted": bool(stats.extra.get("reverted", 0.0)),
            "aux_steps_per_s": stats.extra.get("aux_steps_per_s")}


def mnist_transfer(form: dict, lr: float, steps: int) -> dict:
    from benchmarks.curvature_cost import _problem

    torch.set_num_threads(1)
    problem = _problem("250k", 2048)
    est = FishLegEstimator(FishLegConfig(lr=lr, fit_steps=steps, **form))
    stats = est.fit(problem)
    return {"before": stats.extra["validation_aux_loss_before"], "after": stats.extra["validation_aux_loss_after"],
            "reverted": bool(stats.extra.get("reverted", 0.0)), "aux_steps_per_s": stats.extra["aux_steps_per_s"]}


def run(quick: bool, forms: list[str] | None = None) -> dict:
    lrs = (3e-3, 3e-2) if quick else LRS
    steps_grid = (0, 50, 200) if quick else STEPS
    seeds = {s: exact_targets(s) for s in VALIDATION_SEEDS + TEST_SEEDS}
    selected = {k: v for k, v in FORMS.items() if forms is None or k in forms}
    rows = []
    for label, form in selected.items():
        for lr in lrs:
            for steps in steps_grid:
                for seed in VALIDATION_SEEDS:
                    gamma, targets = seeds[seed]
                    r = q_error(form, lr, steps, seed, gamma, targets)
                    rows.append({"form": label, "lr": lr, "steps": steps, "seed": seed, "split": "validation", **r})
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    transfer = []
    for label, form in selected.items():
        for lr in lrs:
            for steps in ((50,) if quick else (50, 200)):
                transfer.append({"form": label, "lr": lr, "steps": steps, **mnist_transfer(form, lr, steps)})
                print(json.dumps(transfer[-1]), file=sys.stderr, flush=True)
    chosen = {label: choose(rows, transfer, label) for label in selected}
    for label, form in selected.items():
        lr, steps = chosen[label]
        for tag, (l, s, probes) in {"chosen": (lr, steps, 1), "chosen, 4 probes": (lr, steps, 4), "previous default": (*OLD_DEFAULT, 1)}.items():
            for seed in TEST_SEEDS:
                gamma, targets = seeds[seed]
                r = q_error(form, l, s, seed, gamma, targets, probes=probes)
                rows.append({"form": label, "lr": l, "steps": s, "seed": seed, "split": "test", "setting": tag, "probes": probes, **r})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {"sizes": SIZES, "rows": rows, "transfer": transfer, "chosen": {k: {"lr": v[0], "steps": v[1]} for k, v in chosen.items()}}


def _mean(rows: list[dict], key: str, **kw) -> float:
    vals = [r[key] for r in rows if all(r.get(k) == v for k, v in kw.items())]
    return float(np.mean(vals)) if vals else float("nan")


def choose(rows: list[dict], transfer: list[dict], form: str) -> tuple[float, int]:
    """Validation only: best lr among those not reverted on the MNIST MLP; fewest steps within 10% of its best."""
    val = [r for r in rows if r["form"] == form and r["split"] == "validation"]
    stable = {r["lr"] for r in transfer if r["form"] == form} - {r["lr"] for r in transfer if r["form"] == form and r["reverted"]}
    lrs = sorted({r["lr"] for r in val} & stable) or sorted({r["lr"] for r in val})
    steps_grid = sorted({r["steps"] for r in val})
    err = {(lr, s): _mean(val, "error", lr=lr, steps=s) for lr in lrs for s in steps_grid}
    lr = min(lrs, key=lambda x: min(err[(x, s)] for s in steps_grid))
    floor = min(err[(lr, s)] for s in steps_grid)
    return lr, next(s for s in steps_grid if err[(lr, s)] <= 1.1 * floor)


def render(result: dict) -> str:
    rows = result["rows"]
    lines = [f"FishLeg Q vs the exact damped inverse Fisher, MLP {'-'.join(map(str, result['sizes']))} (tanh, categorical),",
             "relative Frobenius error averaged over layers; fresh fit per cell; 1 thread.", ""]
    for form in (f for f in FORMS if f in result["chosen"]):
        val = [r for r in rows if r["form"] == form and r["split"] == "validation"]
        steps_grid = sorted({r["steps"] for r in val})
        lrs = sorted({r["lr"] for r in val})
        lines += [f"### {form}: validation seeds {list(VALIDATION_SEEDS)}, error (seconds per fit)", "",
                  "| lr \\ steps | " + " | ".join(map(str, steps_grid)) + " |", "|---|" + "---|" * len(steps_grid)]
        for lr in lrs:
            cells = [f"{_mean(val, 'error', lr=lr, steps=s):.3f} ({_mean(val, 'seconds', lr=lr, steps=s):.2f}s)" for s in steps_grid]
            lines.append(f"| {lr:g} | " + " | ".join(cells) + " |")
        lines += ["", f"Transfer check, MNIST 784-300-50-10 MLP (validation auxiliary loss, lower is better):", "",
                  "| lr | steps | A before | A after | reverted | aux steps/s |", "|---|---|---|---|---|---|"]
        for r in (t for t in result["transfer"] if t["form"] == form):
            lines.append(f"| {r['lr']:g} | {r['steps']} | {r['before']:.6g} | {r['after']:.6g} | {'yes' if r['reverted'] else 'no'} | {r['aux_steps_per_s']:.1f} |")
        c = result["chosen"][form]
        lines += ["", f"Chosen on validation: lr {c['lr']:g}, {c['steps']} steps.", "",
                  f"Test seeds {list(TEST_SEEDS)}:", "", "| setting | lr | steps | probes | error | seconds | aux steps/s |", "|---|---|---|---|---|---|---|"]
        for tag in ("chosen", "chosen, 4 probes", "previous default"):
            test = [r for r in rows if r["form"] == form and r["split"] == "test" and r.get("setting") == tag]
            if test:
                sps = [r["aux_steps_per_s"] for r in test if r["aux_steps_per_s"]]
                lines.append(f"| {tag} | {test[0]['lr']:g} | {test[0]['steps']} | {test[0]['probes']} | {_mean(test, 'error'):.3f} | "
                             f"{_mean(test, 'seconds'):.2f} | {np.mean(sps) if sps else float('nan'):.0f} |")
        lines.append("")
    if result.get("default_curve"):
        lines.append(render_default_curve(result["default_curve"]))
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Validation error vs fit steps (top) and vs fit wall time (bottom), one line per learning rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    forms = [f for f in FORMS if f in result["chosen"]]
    fig, axes = plt.subplots(2, len(forms), figsize=(5.5 * len(forms), 7.5), squeeze=False)
    for col, form in enumerate(forms):
        val = [r for r in result["rows"] if r["form"] == form and r["split"] == "validation"]
        for lr in sorted({r["lr"] for r in val}):
            steps = sorted({r["steps"] for r in val if r["lr"] == lr})
            ys = [_mean(val, "error", lr=lr, steps=s) for s in steps]
            axes[0, col].plot([max(s, 1) for s in steps], ys, marker="o", label=f"lr {lr:g}")
            axes[1, col].plot([_mean(val, "seconds", lr=lr, steps=s) for s in steps], ys, marker="o", label=f"lr {lr:g}")
        axes[0, col].set_xscale("log")
        axes[0, col].set_xlabel("fit steps (0 plotted at 1)")
        axes[1, col].set_xscale("symlog", linthresh=0.05)
        axes[1, col].set_xlabel("fit wall time (s, 1 thread, shared machine)")
        axes[0, col].set_title(form)
        for ax in axes[:, col]:
            ax.set_ylabel("relative error of Q")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--quick", action="store_true", help="a smoke run on a small grid (not for the committed results)")
    ap.add_argument("--from-json", type=Path, help="re-render the markdown and plot from an earlier JSON result")
    ap.add_argument("--forms", help="comma-separated 0-based indices into FORMS (others' committed rows are kept)")
    ap.add_argument("--default-curve-only", action="store_true",
                    help="only (re)measure the library defaults' curve (the committed grid is kept)")
    args = ap.parse_args(argv)
    forms = None if args.forms is None else [list(FORMS)[int(i)] for i in args.forms.split(",")]
    path = args.out / "fishleg_convergence.json"
    if args.default_curve_only:
        result = json.loads(path.read_text())
        result["default_curve"] = default_curve()
    else:
        result = json.loads(args.from_json.read_text()) if args.from_json else run(args.quick, forms)
        if not args.from_json:
            result["default_curve"] = default_curve()
    args.out.mkdir(parents=True, exist_ok=True)
    if forms is not None and path.exists():  # keep the other forms' rows of the committed result
        old = json.loads(path.read_text())
        result["rows"] = [r for r in old["rows"] if r["form"] not in forms] + result["rows"]
        result["transfer"] = [r for r in old["transfer"] if r["form"] not in forms] + result["transfer"]
        result["chosen"] = {**{k: v for k, v in old["chosen"].items() if k not in forms}, **result["chosen"]}
    (args.out / "fishleg_convergence.json").write_text(json.dumps(result, indent=2) + "\n")
    md = render(result)
    (args.out / "fishleg_convergence.md").write_text(md)
    plot(result, args.out / "fishleg_convergence.png")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
