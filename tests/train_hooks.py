"""Test-side hooks for `python -m cdgfast.train`: stop a run at METHOD:TASK:STEP (0-based task,
1-based step, as RunCallbacks.on_step counts them) with an exception, a SIGKILL (no cleanup runs) or a
SIGINT (Ctrl-C). The production driver knows nothing of them: tests install them through
`run(cfg, callbacks=...)` / `cli.main(argv, callbacks=...)`, or run the command line through this file:

    python tests/train_hooks.py [--crash-at M:T:S] [--kill-at M:T:S] [--interrupt-at M:T:S] CLI-ARGS...
    python -m torch.distributed.run --nproc_per_node 2 tests/train_hooks.py --crash-at er:1:2 CLI-ARGS...
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Callable, List, Optional, Tuple

from cdgfast.train import RunCallbacks, RunStopped

# The command line with these hooks, for subprocess.run(HOOKED_CLI + [hook flag, spec] + CLI-ARGS).
HOOKED_CLI = [sys.executable, os.path.abspath(__file__)]


class InjectedCrash(RunStopped):
    """Raised by StopAt(..., "crash"): the run stops as on a failure (the CLI exits with code 1)."""


def parse_at(spec: str) -> Tuple[str, int, int]:
    """"rank1+gd:1:2" -> ("rank1+gd", 1, 2)."""
    method, task, step = spec.rsplit(":", 2)
    return method, int(task), int(step)


class StopAt(RunCallbacks):
    """At METHOD:TASK:STEP: raise InjectedCrash ("crash"), SIGKILL ("kill") or SIGINT ("interrupt") this process."""

    HOW = ("crash", "kill", "interrupt")

    def __init__(self, at: str, how: str = "crash"):
        if how not in self.HOW:
            raise ValueError(f"how: expected one of {self.HOW}, got {how!r}")
        self.at, self.how = parse_at(at), how
        if how == "interrupt":
            # a process started in the background by a non-interactive shell inherits SIGINT ignored, and
            # Python then raises no KeyboardInterrupt: restore the handler a terminal user has
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def on_step(self, method: str, task: int, step: int) -> None:
        if (method, task, step) != self.at:
            return
        if self.how == "crash":
            raise InjectedCrash(f"injected crash at {method}:{task}:{step}")
        os.kill(os.getpid(), signal.SIGKILL if self.how == "kill" else signal.SIGINT)


class OnStep(RunCallbacks):
    """Calls `fn(method, task, step)` after every training step."""

    def __init__(self, fn: Callable[[str, int, int], None]):
        self.fn = fn

    def on_step(self, method: str, task: int, step: int) -> None:
        self.fn(method, task, step)


def _split_argv(argv: List[str]) -> Tuple[Optional[StopAt], List[str]]:
    """The leading --crash-at / --kill-at / --interrupt-at SPEC (at most one), and the CLI's arguments."""
    flags = {f"--{how}-at": how for how in StopAt.HOW}
    if len(argv) >= 2 and argv[0] in flags:
        return StopAt(argv[1], flags[argv[0]]), argv[2:]
    return None, argv


def main(argv: Optional[List[str]] = None) -> int:
    from cdgfast.train.cli import main as cli_main

    hook, rest = _split_argv(list(sys.argv[1:] if argv is None else argv))
    return cli_main(rest, callbacks=hook)


if __name__ == "__main__":
    sys.exit(main())
