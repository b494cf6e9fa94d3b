"""Stopping a trial cleanly on request: a checkpoint at the next step boundary, then exit.

Schedulers warn before they take a job away (SLURM's ``--signal=USR1@120`` ahead of the time
limit, SIGTERM on preemption), and a user at a terminal presses Ctrl-C (SIGINT): the first
Ctrl-C stops like SIGTERM, a second one aborts at once (KeyboardInterrupt).  ``StopSignal.install()`` turns those signals into a flag and
nothing more (a handler that saved from inside a signal would interrupt a step half-way, and
on one rank only); ``train()`` checks the flag between optimizer steps, writes a full
checkpoint and raises ``TrialStopped``.  Running the same trial again resumes from it, with
nothing lost beyond the step that was under way."""
from __future__ import annotations

import signal
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mtl.dist import DistContext

# No torch at import: launchers read EXIT_STOPPED without paying for it.

# EX_TEMPFAIL (sysexits.h): a temporary failure, try again.  The exit code of a trial that
# stopped on request after saving its checkpoint, so a launcher can tell it from a crash.
EXIT_STOPPED = 75


class TrialStopped(Exception):
    def __init__(self, step: int, signal_name: str, checkpoint: str):
        super().__init__(f"{signal_name} at step {step}: checkpoint {checkpoint} saved "
                         f"(run the same trial again to resume)")
        self.step, self.signal_name, self.checkpoint = step, signal_name, checkpoint


class StopSignal:
    """A flag raised by SIGUSR1, SIGTERM or SIGINT (or ``request()``), agreed across ranks."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None

    def install(self) -> "StopSignal":
        """Handle the signals in this process (the main thread only: Python's rule)."""
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self.signum is not None:
                raise KeyboardInterrupt      # the second Ctrl-C: the user does not want to wait
            import sys

            print("stopping after the step under way, with a checkpoint (Ctrl-C again aborts at once)",
                  file=sys.stderr, flush=True)
        self.signum = signum

    def request(self, signum: int = signal.SIGUSR1) -> None:
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "request"

    def requested(self, dist: "DistContext") -> bool:
        """Whether any rank was asked to stop.  With peers this is a collective (every rank calls
        it at the same step) and a host sync: ranks get the signal at slightly different times,
        and all of them must stop after the same step or the next collective would hang."""
        local = self.signum is not None
        if not dist.distributed:
            return local
        import torch
        import torch.distributed as tdist

        flag = torch.tensor([1.0 if local else 0.0], device=dist.device)
        tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
        if flag.item() and self.signum is None:
            self.signum = signal.SIGUSR1   # a peer's signal: stop the same way
        return bool(flag.item())
