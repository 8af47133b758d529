"""The one exception type users see.

Anything raised as `PtuneError` is printed by the CLI as a single line (`error: ...`) with exit
code 2, no traceback (set `PTUNE_TRACEBACK=1` to get one). The message must name the problem and
the fix. Everything else is a bug and keeps its traceback.
"""


class PtuneError(Exception):
    """A problem with the user's input or environment, explained in one line."""
