"""Preemption notices (SIGTERM, and SIGUSR1 as SLURM's ``--signal``): a rank records them and
acts at a step boundary, by saving and exiting with code 75 so that the job is requeued.

A notice must never kill a rank outright, at any moment of its life: not during start-up, when a
requeued job's ranks are still importing torch (the batch script requeues only a job that saved,
so a rank that died there would end the run), and not after the run's outcome is decided, when
Python, as the interpreter exits, gives back the default action (death) to every signal it had a
handler for, which would turn a finished run's exit code 0 into a death by SIGTERM."""

from __future__ import annotations

import signal

NOTICES = (signal.SIGTERM, signal.SIGUSR1)


class Preemption:
    """The process's recorder of preemption notices: ``signal`` is the first one received."""

    _current: Preemption | None = None

    def __init__(self) -> None:
        self.signal: int | None = None
        self.listening = True
        for sig in NOTICES:
            signal.signal(sig, self._handle)

    @classmethod
    def listen(cls) -> Preemption:
        """The recorder, installed by the first call (the entry point's first line); later calls
        return it with any notice it has received, until it is settled."""
        if cls._current is None or not cls._current.listening:
            cls._current = cls()
        return cls._current

    def _handle(self, signum, frame) -> None:
        if self.signal is None:
            self.signal = signum

    def settle(self) -> None:
        """The run's outcome is decided and saved: from here on a notice has nothing to save, and
        is ignored (SIG_IGN survives the interpreter's exit, a Python handler does not)."""
        self.listening = False
        for sig in NOTICES:
            signal.signal(sig, signal.SIG_IGN)


def ignore_preemption_signals(worker_id: int) -> None:
    """DataLoader worker init: SLURM signals every process of a job step, workers included; a
    worker killed by SIGTERM would crash its rank before the rank could save. The rank's main
    process decides, and ends its workers itself."""
    for sig in NOTICES:
        signal.signal(sig, signal.SIG_IGN)
