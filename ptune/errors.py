"""The one exception type users see.

Anything raised as `PtuneError` is printed by the CLI as a single line (`error: ...`) with exit
code 2, no traceback (set `PTUNE_TRACEBACK=1` to get one). The message must name the problem and
the fix. Everything else is a bug and keeps its traceback.
"""


class PtuneError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class Stopped(PtuneError):
    """Training stopped by a signal at a step boundary, after saving a checkpoint. `signum` says
    which: a launcher that can requeue the job (SLURM through submitit) continues it from there."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
