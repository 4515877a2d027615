"""Figures of the rank-1 paper's section 3.2 from a `geometry.json`-style result (matplotlib, Agg)."""
from __future__ import annotations

import math
import os
from typing import Dict, List

import numpy as np


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_all(result: dict, out_dir: str) -> List[str]:
    """Write fig1_mse.png, fig2_cosine.png, fig3a_mean_grad_cosine.png, fig3b_eigenvalues.png,
    fig3c_eig_ratio.png, fig3d_rel_frobenius.png into `out_dir`; return their paths."""
    plt = _plt()
    os.makedirs(out_dir, exist_ok=True)
    per_t: List[Dict] = result["timesteps"]
    ts = [r["t"] for r in per_t]
    paths = []

    def save(fig, name):
        path = os.path.join(out_dir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)

    # Fig. 1: MSE between x_t and sqrt(1 - abar_t) eps_hat.
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    mse = [r["scaled_prediction_mse"]["mean"] for r in per_t]
    sd = [r["scaled_prediction_mse"]["std"] for r in per_t]
    ax.errorbar(ts, mse, yerr=sd, marker="o", capsize=3)
    ax.set_xlabel("timestep t")
    ax.set_ylabel(r"MSE$(x_t, \sqrt{1-\bar\alpha_t}\,\hat\varepsilon)$")
    ax.set_title("Fig. 1: scaled prediction vs input")
    save(fig, "fig1_mse.png")

    # Fig. 2: per-sample |cos(g_i, mu)| as pixels, one panel per t (as in the paper), plus histograms.
    cols = len(per_t)
    fig, axes = plt.subplots(2, cols, figsize=(2.2 * cols, 4.6), squeeze=False)
    for j, r in enumerate(per_t):
        cos = np.asarray(r["cosine"], dtype=float)
        side = int(math.ceil(math.sqrt(cos.size)))
        grid = np.full(side * side, np.nan)
        grid[:cos.size] = cos
        im = axes[0, j].imshow(grid.reshape(side, side), cmap="Reds", vmin=0.0, vmax=1.0)
        axes[0, j].set_title(f"t = {r['t']}", fontsize=9)
        axes[0, j].axis("off")
        axes[1, j].hist(cos, bins=20, range=(0, 1), color="tab:red")
        axes[1, j].set_xlabel(r"$|\cos(g_i, \mu)|$", fontsize=8)
        axes[1, j].tick_params(labelsize=7)
    fig.colorbar(im, ax=axes[0, :].tolist(), shrink=0.8)
    fig.suptitle("Fig. 2: |cos| of per-sample gradients with their mean")
    path = os.path.join(out_dir, "fig2_cosine.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)

    # Fig. 3a: pairwise cosine similarity of mu_t across timesteps.
    if result.get("mean_grad_cosine") is not None:
        M = np.asarray(result["mean_grad_cosine"], dtype=float)
        fig, ax = plt.subplots(figsize=(4.6, 3.9))
        im = ax.imshow(M, cmap="viridis", vmin=min(0.0, float(M.min())), vmax=1.0)
        ax.set_xticks(range(len(ts)), [str(t) for t in ts], rotation=90, fontsize=7)
        ax.set_yticks(range(len(ts)), [str(t) for t in ts], fontsize=7)
        for a in range(len(ts)):
            for b in range(len(ts)):
                ax.text(b, a, f"{M[a, b]:.2f}", ha="center", va="center", fontsize=6, color="w")
        fig.colorbar(im, ax=ax)
        ax.set_title(r"Fig. 3a: $\cos(\mu_t, \mu_s)$")
        save(fig, "fig3a_mean_grad_cosine.png")

    # Fig. 3b: top-k eigenvalues of F_t (log scale).
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    eig = np.asarray([r["eigenvalues"] for r in per_t], dtype=float)
    for k in range(eig.shape[1]):
        vals = np.where(eig[:, k] > 0, eig[:, k], np.nan)
        ax.plot(ts, vals, marker="o", label=rf"$\lambda_{k + 1}$")
    ax.set_yscale("log")
    ax.set_xlabel("timestep t")
    ax.set_ylabel("eigenvalue of $F_t$")
    ax.legend(fontsize=7)
    ax.set_title("Fig. 3b: top eigenvalues")
    save(fig, "fig3b_eigenvalues.png")

    # Fig. 3c: lambda_2 / lambda_1.
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.plot(ts, [r["eig_ratio"] for r in per_t], marker="o")
    ax.set_xlabel("timestep t")
    ax.set_ylabel(r"$\lambda_2 / \lambda_1$")
    ax.set_title("Fig. 3c: eigengap ratio")
    save(fig, "fig3c_eig_ratio.png")

    # Fig. 3d: relative Frobenius errors.
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.plot(ts, [r["rank1_rel_err"] for r in per_t], marker="o", label=r"rank-1 $c^* \mu\mu^T$")
    ax.plot(ts, [r["diag_rel_err"] for r in per_t], marker="s", label="diagonal")
    ax.plot(ts, [r["best_rank1_rel_err"] for r in per_t], ls="--", color="gray", label="best rank-1 (SVD)")
    ax.set_xlabel("timestep t")
    ax.set_ylabel(r"$\|F - \hat F\|_F / \|F\|_F$")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    ax.set_title("Fig. 3d: relative Frobenius error")
    save(fig, "fig3d_rel_frobenius.png")
    return paths
