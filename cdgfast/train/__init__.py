"""cdgfast.train: the benchmark driver `python -m cdgfast.train` (CLI, presets, loop, checkpoints,
distributed helpers, reports). Programmatic use::

    from cdgfast.train import RunConfig, run
    results = run(RunConfig(preset="default", scale="smoke", out="runs/try"))
"""
from .loop import (NonFiniteLoss, RunCallbacks, RunConfig, RunError, RunInterrupted, RunStopped, TRAINER_METHODS,
                   run, run_seeds)
from .presets import PRESETS, SCALES, Preset, ScaleConfig, get_preset


def main(argv=None, *, callbacks=None) -> int:
    from .cli import main as _main
    return _main(argv, callbacks=callbacks)


__all__ = ["RunConfig", "run", "run_seeds", "RunCallbacks", "RunError", "RunInterrupted", "RunStopped", "NonFiniteLoss",
           "TRAINER_METHODS",
           "PRESETS", "SCALES", "Preset", "ScaleConfig", "get_preset", "main"]
