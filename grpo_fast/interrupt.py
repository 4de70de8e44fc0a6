"""Interruptions: SIGINT (Ctrl-C) and SIGTERM (a preemptible GPU, a job scheduler, `kill`).

The first signal asks the run to stop at the next step boundary: the step under way completes, a checkpoint of it
is written, and the run ends with `Stopped` (exit status 128 + the signal: 130 for SIGINT, 143 for SIGTERM) after
printing where the checkpoint is and the command that resumes. A second signal exits at once: `Stopped` is raised
from the handler itself (a BaseException, so no `except Exception` in user code swallows it); a checkpoint being
written stays a .tmp directory and the previous one is intact.

The handlers are installed for the whole of `train.run` (`catching`), setup and model loading included: a signal
then stops the run before its first step. Under torchrun the ranks agree at each boundary (one small collective).
"""

from __future__ import annotations

import functools
import os
import shlex
import signal
import sys
import threading

from . import distributed
from .run_log import say

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(BaseException):
    """The run ended on a signal; `code` is the exit status, `message` says what was saved."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class Signals:
    """The signal handler's state: which signal asked the run to stop, if any."""

    def __init__(self):
        self.signum: int | None = None

    def handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            raise Stopped(128 + signum, f"{name} again: exiting at once, without a checkpoint of the step under way")
        self.signum = signum
        say(f"{name} received: stopping after the step under way (send it again to exit at once)")

    def stop(self) -> bool:
        """Whether any rank was signalled (one small collective under torchrun, so that all ranks stop together)."""
        return distributed.all_max([float(self.signum is not None)])[0] > 0

    def stopped(self, message: str) -> Stopped:
        return Stopped(128 + (self.signum or signal.SIGTERM), message)


_state: Signals | None = None  # the running run's (signals are process-wide)


def catching(run):
    """Decorates the trainer's `run`: the handlers are installed for its whole duration (setup and model loading
    too) and the previous ones restored after. Signals can only be handled in the main thread: elsewhere they keep
    their default behaviour."""

    @functools.wraps(run)
    def wrapped(*args, **kwargs):
        global _state
        outer, _state = _state, Signals()
        main = threading.current_thread() is threading.main_thread()
        previous = {s: signal.signal(s, _state.handle) for s in SIGNALS} if main else {}
        try:
            return run(*args, **kwargs)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            _state = outer

    return wrapped


def signals() -> Signals:
    """The state of the run under way (a fresh one outside `catching`)."""
    return _state or Signals()


def resume_command(argv: list[str]) -> str:
    """The command line that continues this run: the same arguments plus --resume, under the same launcher."""
    args = [a for a in argv if a not in ("--resume", "--no-resume")] + ["--resume"]
    per_node = os.environ.get("LOCAL_WORLD_SIZE")
    launcher = ["torchrun", f"--nproc_per_node={per_node}"] if per_node else [sys.executable]
    return shlex.join([*launcher, "-m", "grpo_fast.train", *args])
