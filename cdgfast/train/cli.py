"""Command line of `python -m cdgfast.train` (also `torchrun --nproc_per_node N -m cdgfast.train`).

Exit codes: 0 success; 2 bad input (unknown preset / method / data set, a bad --set value, refused
output directory, missing data or weights, an unreadable checkpoint on --resume); 1 a run that stopped
(non-finite loss or another RunStopped, other errors); 130 interrupted with Ctrl-C (the message gives the
--resume command that continues it).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import List, Optional

from cdgfast.data import DATASET_ALIASES, DATASET_REGISTRY, canonical_dataset
from cdgfast.metrics.fid import FID_BACKBONES, FidBackboneUnavailable, resolve_fid_backbone

from .presets import DEFAULT_PRESET, FAMILIES, PRESETS, SCALES
from .text_presets import TEXT_METHODS, TEXT_PRESETS


def _method_names() -> List[str]:
    from .loop import all_method_names
    return all_method_names()


def listing() -> str:
    from .loop import TRAINER_METHODS
    lines = ["presets:"]
    for fam, names in FAMILIES.items():
        for n in names:
            lines.append(f"  {n:<22} {PRESETS[n].description}")
    lines.append("personalization presets (text-to-image, the DC-score paper; methods: " + ", ".join(TEXT_METHODS) + "):")
    for n, p in TEXT_PRESETS.items():
        lines.append(f"  {n:<22} {p.description} (scales: {', '.join(p.scales)})")
    lines.append("methods (cdgfast.methods.available() and the trainer's own):")
    from cdgfast.methods import available
    avail = available()
    for m in _method_names():
        lines.append(f"  {m:<22} {'' if m in avail else TRAINER_METHODS[m]['help']}".rstrip())
    lines.append("data sets:")
    lines.append("  " + ", ".join(DATASET_REGISTRY) + f"  (aliases: {', '.join(f'{a}={b}' for a, b in DATASET_ALIASES.items())})")
    lines.append("scales: " + ", ".join(SCALES))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    methods = _method_names()
    epilog = (
        f"presets: {', '.join(PRESETS)}\n"
        f"personalization presets: {', '.join(TEXT_PRESETS)} (--pretrained, --concepts, --clip)\n"
        f"methods: {', '.join(methods)}\n"
        f"data sets: {', '.join(DATASET_REGISTRY)}\n\n"
        "Without arguments: the embedded default (scikit-learn digits at 16x16, 5 tasks x 2 classes, finetune vs gd "
        "vs rank1+gd, a few CPU minutes), written to runs/default-cpu.\n"
        "FID (--fid auto): Inception-FID when the FID Inception weights are present (--inception PATH, or "
        "torch-fidelity's weights-inception-2015-12-05-6726825d.pth in the torch hub cache; never downloaded), "
        "else classifier-FID (a small CNN trained on the same data); --scale paper refuses to run without the "
        "Inception weights unless --fid classifier.\n"
        "Distributed: torchrun --nproc_per_node N -m cdgfast.train [options] (gloo on CPU, NCCL on GPU).")
    p = argparse.ArgumentParser(prog="python -m cdgfast.train",
                                description="Continual-learning benchmarks for diffusion models (cdgfast).",
                                epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=DEFAULT_PRESET, metavar="NAME",
                   help=f"benchmark preset (default: {DEFAULT_PRESET}); see --list")
    p.add_argument("--method", dest="methods", action="append", metavar="M", nargs="+",
                   help="method(s) to run instead of the preset's (repeatable, or several after one flag)")
    p.add_argument("--dataset", metavar="D", help="data set instead of the preset's; see --list")
    p.add_argument("--scale", choices=SCALES, default=None,
                   help="smoke (< 2 min), cpu (minutes to an hour on a CPU; default) or paper (GPU, paper settings)")
    p.add_argument("--data-root", metavar="DIR", help="folder holding the data sets (DIR/mnist, DIR/cifar10, ...)")
    p.add_argument("--out", metavar="DIR", help="output directory (default runs/<preset>-<scale>)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue an interrupted run from its last complete task")
    g.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--allow-pickle", action="store_true",
                   help="with --resume: also read checkpoints of the old pickle format (.pt); unpickling can run "
                        "any code a file contains, so only for runs you made yourself")
    sg = p.add_mutually_exclusive_group()
    sg.add_argument("--seed", type=int, default=None,
                    help="seed of the training randomness (default 0); the evaluation split and the FID "
                         "classifier are fixed and do not depend on it")
    sg.add_argument("--seeds", type=int, nargs="+", metavar="S",
                    help="run every seed (OUT/seed-S/, each resumable) and report mean ± standard error over them")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--inception", metavar="PATH",
                   help="local FID Inception weights: torch-fidelity's weights-inception-2015-12-05-6726825d.pth "
                        "(needs the fid extra) or a TorchScript FID Inception; default: the torch hub cache")
    p.add_argument("--fid", choices=FID_BACKBONES, default="auto",
                   help="FID features: inception (the FID Inception; refuses without its weights), classifier "
                        "(classifier-FID) or auto (default: inception when its weights are present, else classifier; "
                        "at --scale paper, refuses without them)")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="where the FID classifier and the dc-digits base model are cached (default ~/.cache/cdgfast)")
    p.add_argument("--pretrained", metavar="DIR",
                   help="personalization presets: a local Stable Diffusion v1.x directory (unet/, vae/, text_encoder/, "
                        "tokenizer/, scheduler/; nothing is downloaded)")
    p.add_argument("--concepts", metavar="DIR",
                   help="personalization presets: one folder of images per concept (DIR/<concept>/*.jpg, tasks in "
                        "name order; an optional DIR/<concept>/prompts.txt names the concept's class word)")
    p.add_argument("--clip", metavar="DIR",
                   help="personalization presets: a local CLIP directory (save_pretrained) for the metrics; dc-digits "
                        "without it uses the digits classifier's features")
    p.add_argument("--steps", type=int, metavar="N", help="override: training steps per task")
    p.add_argument("--fid-samples", type=int, metavar="N", help="override: generated samples per class for FID/KLD")
    p.add_argument("--batch-size", type=int, metavar="N", help="override: training batch size")
    p.add_argument("--num-tasks", type=int, metavar="N", help="override: run only the first N tasks")
    p.add_argument("--set", dest="method_args", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="override a method hyperparameter after the preset's, e.g. --set rank1.lam=100 (applies to "
                        "rank1 and to compositions such as rank1+gd; repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.add_argument("--list", action="store_true", help="list presets, methods and data sets, then exit")
    p.add_argument("--print-config", action="store_true",
                   help="print the fully resolved run (data, model, training, evaluation, every method's "
                        "hyperparameters after --set) as JSON and exit without doing any work")
    return p


def resume_command(argv: List[str], args: argparse.Namespace, out, world_size: int = 1) -> str:
    """The command line that continues this run: the same arguments, --resume instead of --overwrite,
    and --out spelled out (the default folder moves on to -2, -3, ... for a new run)."""
    words = [a for a in argv if not (args.overwrite and a.startswith("--ov"))]  # argparse accepts prefixes
    if not args.resume:
        words.append("--resume")
    if args.out is None:
        words += ["--out", str(out)]
    head = ([sys.executable, "-m", "cdgfast.train"] if world_size <= 1 else
            ["torchrun", f"--nproc_per_node={world_size}", "-m", "cdgfast.train"])
    return shlex.join(head + words)


def main(argv: Optional[List[str]] = None, *, callbacks=None) -> int:
    """Run the command line on `argv` (default sys.argv[1:]); `callbacks` (a RunCallbacks) observe the
    run. Returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        print(listing())
        return 0
    try:
        return _main(parser, args, argv, callbacks)
    except KeyboardInterrupt:  # before the run started (imports, checks)
        print("interrupted (Ctrl-C) before the run started; nothing was written", file=sys.stderr)
        return 130


def _main(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: List[str], callbacks) -> int:
    from .loop import (RunConfig, RunError, RunInterrupted, RunStopped, all_method_names, parse_method_args, run,
                       run_seeds)
    from .data import DataUnavailable

    if args.preset in TEXT_PRESETS:
        return _main_personalization(parser, args, argv)
    for opt in ("pretrained", "concepts", "clip"):
        if getattr(args, opt) is not None:
            parser.error(f"argument --{opt}: only the personalization presets ({', '.join(TEXT_PRESETS)}) take it")
    if args.preset not in PRESETS:
        parser.error(f"argument --preset: unknown preset {args.preset!r}; expected one of "
                     f"{', '.join(list(PRESETS) + list(TEXT_PRESETS))}")
    methods = [m for group in args.methods for m in group] if args.methods else None
    valid = all_method_names()
    for m in methods or []:
        if m not in valid:
            parser.error(f"argument --method: unknown method {m!r}; expected one of {', '.join(valid)}")
    if args.dataset is not None:
        try:
            canonical_dataset(args.dataset)
        except ValueError as exc:
            parser.error(f"argument --dataset: {exc}")
    try:
        method_args = parse_method_args(args.method_args)
    except ValueError as exc:
        parser.error(f"argument --{exc}")
    try:  # the FID backbone before any work: files only, nothing loaded or downloaded
        resolve_fid_backbone(args.fid, args.inception, args.scale or "cpu")
    except FidBackboneUnavailable as exc:
        if not args.print_config:  # --print-config shows that the run would refuse, and why
            print(f"error: {exc}", file=sys.stderr)
            return 2
    except ValueError as exc:
        parser.error(f"argument --{exc}")
    cfg = RunConfig(preset=args.preset, methods=methods, dataset=args.dataset, scale=args.scale or "cpu",
                    data_root=args.data_root, out=args.out, resume=args.resume, overwrite=args.overwrite,
                    seed=0 if args.seed is None else args.seed, device=args.device, inception=args.inception, fid=args.fid,
                    cache_dir=args.cache_dir,
                    steps=args.steps, fid_samples=args.fid_samples, batch_size=args.batch_size,
                    num_tasks=args.num_tasks, progress=not args.no_progress,
                    allow_pickle=args.allow_pickle, method_args=method_args)
    if args.print_config:
        import json
        from .loop import resolved_config
        try:
            print(json.dumps(resolved_config(cfg), indent=1))
        except RunError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    try:
        if args.seeds:
            run_seeds(cfg, args.seeds, callbacks)
        else:
            run(cfg, callbacks)
    except (RunError, DataUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunStopped as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except RunInterrupted as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"\ninterrupted (Ctrl-C) {exc.where}.", file=sys.stderr)
            if exc.out is not None:
                print(f"Continue it with:\n  {resume_command(argv, args, exc.out, exc.world_size)}", file=sys.stderr)
        return 130
    finally:
        from .distributed import cleanup
        cleanup()
    return 0


# options of the class-incremental presets that a personalization run does not have
_CLASS_ONLY_OPTIONS = (("dataset", None), ("data_root", None), ("inception", None), ("fid", "auto"),
                       ("fid_samples", None), ("batch_size", None), ("allow_pickle", False))


def _main_personalization(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: List[str]) -> int:
    """`--preset dc-*`: the continual-personalization driver (cdgfast.train.personalize)."""
    from .loop import RunError, RunStopped, parse_method_args
    from .personalize import TextRunConfig, resolved_text_config, run_personalization, run_text_seeds, text_out_dir

    for opt, default in _CLASS_ONLY_OPTIONS:
        if getattr(args, opt) != default:
            parser.error(f"argument --{opt.replace('_', '-')}: the personalization presets do not take it")
    methods = [m for group in args.methods for m in group] if args.methods else None
    for m in methods or []:
        if m not in TEXT_METHODS:
            parser.error(f"argument --method: {m!r} is not a row of the personalization benchmark; expected one of "
                         f"{', '.join(TEXT_METHODS)}")
    try:
        method_args = parse_method_args(args.method_args)
    except ValueError as exc:
        parser.error(f"argument --{exc}")
    cfg = TextRunConfig(preset=args.preset, scale=args.scale, methods=methods, out=args.out, resume=args.resume,
                        overwrite=args.overwrite, seed=0 if args.seed is None else args.seed, device=args.device,
                        pretrained=args.pretrained, concepts=args.concepts, clip=args.clip, cache_dir=args.cache_dir,
                        steps=args.steps, num_tasks=args.num_tasks, progress=not args.no_progress,
                        method_args=method_args)
    try:
        if args.print_config:
            import json
            print(json.dumps(resolved_text_config(cfg), indent=1))
            return 0
        cfg.out = str(text_out_dir(cfg))  # spelled out, so an interrupted run's --resume command names it
        if args.seeds:
            run_text_seeds(cfg, args.seeds)
        else:
            run_personalization(cfg)
    except RunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunStopped as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"\ninterrupted (Ctrl-C); finished methods are kept. Continue with:\n  "
                  f"{resume_command(argv, args, cfg.out, int(os.environ.get('WORLD_SIZE', '1')))}",
                  file=sys.stderr)
        return 130
    finally:
        from .distributed import cleanup
        cleanup()
    return 0
