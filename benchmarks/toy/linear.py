"""``python -m benchmarks linear``: the linear flow in closed form (paper Fig. 2, Theorem 3).

1. Fig. 2: 1-D Gaussians with variances delta; the linear flow fitted to N samples in closed
   form with the KL regulariser (Theorem 3, prior G = 1) and with L2 on U, for alpha over a log
   range. KL shrinks the fitted variance toward the prior's 1; L2 adds alpha/N to it, so the
   density flattens out ("collapses") as alpha grows.
2. d > N: plain maximum likelihood has no solution (log|det U| grows without bound under
   gradient descent); mean NLL + ``klj_reg.penalty(..., estimator="exact")`` trained by gradient
   descent reaches Theorem 3's (N T + alpha I) / (N + alpha) with alpha = 2 N a.

Writes ``fig2.png``, ``theorem3.png`` and ``linear.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import klj_reg
from klj_reg import linear

from ..common.records import run_metadata

DELTAS = (0.2, 0.5, 2.0, 5.0)
ALPHAS = (0.0, 1.0, 10.0, 100.0, 1000.0, 10000.0)


def fig2(n: int, seed: int) -> dict[str, Any]:
    """Fitted 1-D variances per delta and alpha, for both regularisers."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for delta in DELTAS:
        x = math.sqrt(delta) * torch.randn(n, 1, generator=g, dtype=torch.float64)
        row: dict[str, Any] = {
            "delta": delta,
            "mean": float(x.mean()),
            "T": float(linear.sample_covariance(x)),
        }
        row["kl"] = [float(linear.klj_covariance(x, a)) for a in ALPHAS]
        row["l2"] = [float(linear.l2_covariance(x, a)) for a in ALPHAS]
        rows.append(row)
    return {"n": n, "seed": seed, "alphas": list(ALPHAS), "rows": rows}


def plot_fig2(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = torch.linspace(-8, 8, 801, dtype=torch.float64)
    rows = result["rows"]
    fig, axes = plt.subplots(2, len(rows), figsize=(3.2 * len(rows), 5.6), sharex=True)
    colours = plt.get_cmap("viridis")(torch.linspace(0, 0.9, len(ALPHAS) - 1).tolist())
    for col, row in enumerate(rows):
        for r, (key, name) in enumerate((("kl", "KL (Theorem 3)"), ("l2", "L2 on U"))):
            ax = axes[r, col]
            for k, (alpha, var) in enumerate(zip(ALPHAS, row[key], strict=True)):
                p = linear.density_1d(t, row["mean"], var)
                if alpha == 0:
                    ax.plot(t, p, "k:", lw=2, label="alpha = 0 (MLE)")
                else:
                    ax.plot(t, p, color=colours[k - 1], label=f"alpha = {alpha:g}")
            ax.plot(t, linear.density_1d(t, 0.0, 1.0), color="tab:red", lw=0.8, ls="--")
            ax.set_title(f"{name}, delta = {row['delta']:g}", fontsize=9)
            if col == 0:
                ax.set_ylabel("fitted density")
    axes[0, 0].legend(fontsize=7, title=f"N = {result['n']}", title_fontsize=7)
    fig.suptitle(
        "Linear flow fitted in closed form to N samples of N(0, delta) (paper Fig. 2); "
        "red dashed: the KL prior N(0, 1)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _flow(u: Tensor, b: Tensor) -> Any:
    def fn(x: Tensor) -> tuple[Tensor, Tensor]:
        return x @ u + b, torch.linalg.slogdet(u)[1].expand(x.shape[0])

    return fn


def _loss(fn: Any, x: Tensor, a: float) -> Tensor:
    z, log_det = fn(x)
    nll = (0.5 * z.square().sum(1) - log_det).mean()
    if a == 0:
        return nll
    return nll + klj_reg.penalty(fn, x, estimator="exact", alpha=a, normaliser="none")


def _relative(a: Tensor, b: Tensor) -> float:
    return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))


def _polish(u: Tensor, b: Tensor, x: Tensor, a: float) -> None:
    """LBFGS from where Adam stopped, to the optimum's float64 precision."""
    fn = _flow(u, b)
    opt = torch.optim.LBFGS([u, b], max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        value = _loss(fn, x, a)
        value.backward()
        return value

    opt.step(closure)


def theorem3(n: int, d: int, a: float, steps: int, seed: int) -> dict[str, Any]:
    """Gradient descent through klj_reg on d > N data, against the closed form."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + 1.0
    alpha = linear.theorem3_alpha(a, n)
    closed = linear.klj_covariance(x, alpha)
    traces: dict[str, list[list[float]]] = {}
    final: dict[str, Tensor] = {}
    for name, weight in (("mle", 0.0), ("klj", a)):
        u = torch.eye(d, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(d, dtype=torch.float64, requires_grad=True)
        fn = _flow(u, b)
        opt = torch.optim.Adam([u, b], lr=0.02)
        trace = []
        for step in range(1, steps + 1):
            loss = _loss(fn, x, weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 50 == 0 or step == 1:
                with torch.no_grad():
                    err = _relative(torch.linalg.inv(u @ u.T), closed)
                    trace.append([step, float(loss), float(torch.linalg.slogdet(u)[1]), err])
        traces[name] = trace
        if name == "klj":
            adam_error = trace[-1][3]
            _polish(u, b, x, weight)
            final = {"u": u.detach(), "b": b.detach()}
    u, b = final["u"], final["b"]
    fitted = torch.linalg.inv(u @ u.T)
    return {
        "n": n,
        "d": d,
        "weight_a": a,
        "alpha": alpha,
        "rank_T": int(torch.linalg.matrix_rank(linear.sample_covariance(x))),
        "adam_steps": steps,
        "adam_lr": 0.02,
        "relative_error_after_adam": adam_error,
        "relative_error_after_lbfgs": _relative(fitted, closed),
        "bias_error_after_lbfgs": float((b + u.T @ x.mean(0)).abs().max()),
        "mle_log_det_trace": [[s, ld] for s, _, ld, _ in traces["mle"]],
        "klj_trace": traces["klj"],
        "columns": ["step", "loss", "log|det U|", "relative error of M^-1"],
    }


def plot_theorem3(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    mle = torch.tensor(result["mle_log_det_trace"])
    klj = torch.tensor(result["klj_trace"])
    left.plot(mle[:, 0], mle[:, 1], label="mean NLL (MLE): no optimum")
    left.plot(klj[:, 0], klj[:, 2], label=f"mean NLL + {result['weight_a']:g} KLJ")
    left.set_xlabel("Adam step")
    left.set_ylabel("log|det U|")
    left.legend(fontsize=8)
    right.semilogy(klj[:, 0], klj[:, 3])
    right.set_xlabel("Adam step")
    right.set_ylabel("relative error of M^-1 (Frobenius)")
    fig.suptitle(
        f"d = {result['d']} > N = {result['n']}: Theorem 3 with alpha = 2Na = {result['alpha']:g}",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks linear", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/linear"))
    parser.add_argument("--n", type=int, default=100, help="samples per 1-D Gaussian")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3000, help="Adam steps for Theorem 3")
    args = parser.parse_args(argv)
    metadata = run_metadata("cpu")  # before anything is written: the tree as it ran
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    one_d = fig2(args.n, args.seed)
    plot_fig2(one_d, args.out / "fig2.png")
    print(f"Fig. 2: fitted variance of N(0, delta) from N = {args.n} samples")
    print("delta  reg " + "".join(f"{f'a={a:g}':>11}" for a in ALPHAS))
    for row in one_d["rows"]:
        for key in ("kl", "l2"):
            values = "".join(f"{v:11.4g}" for v in row[key])
            print(f"{row['delta']:<6g} {key:<3} {values}")

    hdss = theorem3(n=10, d=20, a=0.05, steps=args.steps, seed=args.seed)
    plot_theorem3(hdss, args.out / "theorem3.png")
    mle_log_dets = [ld for _, ld in hdss["mle_log_det_trace"]]
    print(
        f"\nTheorem 3, d = {hdss['d']} > N = {hdss['n']} (rank T = {hdss['rank_T']}), "
        f"a = {hdss['weight_a']}, alpha = 2Na = {hdss['alpha']:g}:\n"
        f"  plain MLE, log|det U| at steps 1 .. {args.steps}: {mle_log_dets[0]:.2f} -> "
        f"{mle_log_dets[len(mle_log_dets) // 2]:.2f} -> {mle_log_dets[-1]:.2f} (no optimum)\n"
        f"  KLJ by gradient descent vs closed form, relative error of M^-1: "
        f"{hdss['relative_error_after_adam']:.2e} after Adam, "
        f"{hdss['relative_error_after_lbfgs']:.2e} after LBFGS; "
        f"b error {hdss['bias_error_after_lbfgs']:.1e}"
    )
    with open(args.out / "linear.json", "w") as f:
        json.dump({**metadata, "fig2": one_d, "theorem3": hdss}, f, indent=1)
    print(f"wrote {args.out}/fig2.png, theorem3.png, linear.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
