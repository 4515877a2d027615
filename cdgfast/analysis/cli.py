"""Command line: `python -m cdgfast.analysis fisher --dataset digits --timesteps 100,200,...,900
--samples 1024 [--checkpoint PATH] --out DIR [--device cpu] [--seed 0] [--train-steps S]`.

Writes DIR/geometry.json, the figures fig1_mse.png, fig2_cosine.png, fig3a_mean_grad_cosine.png,
fig3b_eigenvalues.png, fig3c_eig_ratio.png, fig3d_rel_frobenius.png and (when it trains) DIR/model.safetensors.
A DIR that holds a previous analysis, or anything else, is refused unless --overwrite.

`python -m cdgfast.analyze` is an alias (cdgfast/analyze forwards here).

Exit codes: 0 success; 2 bad input (every option, the data and the checkpoint are checked before any
work; nothing is written then); 130 interrupted with Ctrl-C.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def _timesteps(text: str) -> List[int]:
    """"100,200,300" or a range "100:1000:100" (start:stop:step, stop exclusive)."""
    try:
        if ":" in text:
            parts = [int(p) for p in text.split(":")]
            if len(parts) != 3 or parts[2] <= 0:
                raise ValueError
            return list(range(*parts))
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers (e.g. 100,200,300) or start:stop:step, got {text!r}")


PROG = "python -m cdgfast.analysis"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    from ..data import DATASETS

    parser = argparse.ArgumentParser(prog=prog,
                                     description="Fisher-geometry analysis of a diffusion model.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fisher", help="rank-1 paper section 3.2: eigenvalues, cosines, rank-1 vs diagonal",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="digits", choices=DATASETS)
    p.add_argument("--data-root", default=None, help="folder with the data set files (not needed for digits)")
    p.add_argument("--timesteps", type=_timesteps, default=list(range(100, 1000, 100)),
                   help="fixed timesteps in [0, 1000): comma list or start:stop:step")
    p.add_argument("--samples", type=int, default=1024, help="per-sample gradients per timestep (n >= 2)")
    p.add_argument("--checkpoint", default=None,
                   help="model to analyse (.safetensors, a cdgfast.train checkpoint, or a diffusers model folder); "
                        "if absent, train one and save it")
    p.add_argument("--allow-pickle", action="store_true",
                   help="also read a pickle --checkpoint (.pt); unpickling can run any code the file contains, so "
                        "only for files you made yourself")
    p.add_argument("--out", required=True, help="output folder (new or empty; see --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous analysis in --out (or write into a non-empty folder)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--preset", default="tiny", help="cdgfast.models.build_unet preset")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--chunk-params", type=int, default=None,
                   help="max parameters per gradient group (default: keep n x chunk under 2**27)")
    p.add_argument("--micro-batch", type=int, default=64)
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: Optional[List[str]] = None, *, prog: str = PROG) -> int:
    """Run the command line on `argv` (default sys.argv[1:]); `prog` names the command in usage and
    error messages (the cdgfast.analyze alias passes its own)."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    from .experiment import run_fisher_analysis

    try:
        result = run_fisher_analysis(
            dataset=args.dataset, timesteps=args.timesteps, samples=args.samples, out_dir=args.out,
            checkpoint=args.checkpoint, train_steps=args.train_steps, batch_size=args.batch_size, lr=args.lr,
            preset=args.preset, data_root=args.data_root, device=args.device, seed=args.seed, top_k=args.top_k,
            chunk_params=args.chunk_params, micro_batch=args.micro_batch, figures=not args.no_figures,
            progress=not args.no_progress, overwrite=args.overwrite, allow_pickle=args.allow_pickle)
    except ValueError as exc:
        parser.error(str(exc))  # exits with status 2 and the message
    except KeyboardInterrupt:
        print(f"\ninterrupted (Ctrl-C); {args.out} may hold a partial analysis (rerun with --overwrite)",
              file=sys.stderr)
        return 130
    rows = [{k: r[k] for k in ("t", "eigenvalues", "eig_ratio", "rank1_rel_err", "diag_rel_err", "cosine_mean")}
            for r in result["timesteps"]]
    print(json.dumps(rows, indent=1))
    return 0
