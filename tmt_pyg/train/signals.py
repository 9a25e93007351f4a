"""SIGINT / SIGTERM during training: a stop request the loop reads between steps, and a way out
when the loop cannot get back to read it."""
import os
import select
import signal
import sys
import threading
import time
from typing import Callable

from .distributed import waiting

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Context manager: while it is open, SIGINT and SIGTERM set :attr:`signum` (the first one wins)
    for the training loop to act on at the end of its step.

    A process blocked in a collective never gets back to the loop (Python runs signal handlers only
    between bytecodes of the main thread), so a watcher thread, woken through the signal wakeup fd,
    ends it with exit code ``128 + signum`` and a message naming the collective when
    * a second signal arrives, or
    * the first one finds the main thread waiting in a collective (:func:`distributed.collective`)
      and it is still in that same wait ``grace_s`` seconds later (peers that also got the signal
      join within the grace, so a healthy job still stops at a step boundary and checkpoints).
    Outside the main thread it records nothing (handlers can only be set there).
    """

    def __init__(self, grace_s: float = 10.0, exit: Callable[[int], None] = os._exit):
        self.grace_s, self.exit = grace_s, exit
        self.signum = 0

    def __enter__(self) -> "StopSignals":
        self.signum, self.received = 0, 0
        self.active = threading.current_thread() is threading.main_thread()
        if not self.active:
            return self
        self.read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        self.write_fd = write_fd
        self.previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        self.previous = {s: signal.signal(s, self._record) for s in STOP_SIGNALS}
        self.watcher = threading.Thread(target=self._watch, name="tmt-pyg-signal-watch", daemon=True)
        self.watcher.start()
        return self

    def __exit__(self, *exc) -> None:
        if not self.active:
            return
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        signal.set_wakeup_fd(self.previous_fd)
        os.close(self.write_fd)  # the watcher reads end-of-file and returns
        self.watcher.join()
        os.close(self.read_fd)

    def _record(self, signum, frame) -> None:
        self.signum = self.signum or signum

    def _watch(self) -> None:
        watched = None  # (collective, its count, deadline, signum) of a first signal that found the main thread in one
        while True:
            timeout = None if watched is None else max(0.0, watched[2] - time.monotonic())
            if select.select([self.read_fd], [], [], timeout)[0]:
                byte = os.read(self.read_fd, 1)
                if not byte:
                    return
                if byte[0] not in STOP_SIGNALS:
                    continue
                self.received += 1
                if self.received > 1:
                    self._leave(byte[0], None)
                elif waiting.name is not None:
                    watched = (waiting.name, waiting.count, time.monotonic() + self.grace_s, byte[0])
            elif watched is not None:
                if (waiting.name, waiting.count) == watched[:2]:  # still in the same wait
                    self._leave(watched[3], watched[0])
                watched = None

    def _leave(self, signum: int, collective) -> None:
        where = (f"while waiting {self.grace_s:g} s in {collective}" if collective
                 else "(second signal)")
        print(f"tmt-pyg: {signal.Signals(signum).name} {where}: exiting now, without a checkpoint of this step",
              file=sys.stderr, flush=True)
        self.exit(128 + signum)
