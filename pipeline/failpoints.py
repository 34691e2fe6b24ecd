"""Named moments at which a test may kill this process (``GAN_PIPELINE_KILL_AT=<name>@<step>``),
to show that a kill exactly there loses nothing. Inert unless that variable is set."""

from __future__ import annotations

import os
import signal

VARIABLE = "GAN_PIPELINE_KILL_AT"


def reached(name: str, step: int) -> None:
    """SIGKILL this process if the variable names this moment at this step."""
    if os.environ.get(VARIABLE) == f"{name}@{step}":
        os.kill(os.getpid(), signal.SIGKILL)
