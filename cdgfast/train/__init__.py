"""cdgfast.train: the benchmark driver `python -m cdgfast.train` (CLI, presets, loop, checkpoints,
distributed helpers, reports). Programmatic use::

    from cdgfast.train import RunConfig, run
    results = run(RunConfig(preset="default", scale="smoke", out="runs/try"))
"""
from .loop import InjectedCrash, NonFiniteLoss, RunConfig, RunError, RunInterrupted, TRAINER_METHODS, run
from .presets import PRESETS, SCALES, Preset, ScaleConfig, get_preset


def main(argv=None) -> int:
    from .cli import main as _main
    return _main(argv)


__all__ = ["RunConfig", "run", "RunError", "RunInterrupted", "NonFiniteLoss", "InjectedCrash", "TRAINER_METHODS",
           "PRESETS", "SCALES", "Preset", "ScaleConfig", "get_preset", "main"]
