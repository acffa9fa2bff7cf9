"""`CurateError`: the base of every error caused by the run's inputs, config or run directory rather than by a bug.

`python -m curate` prints these on one line (`error: ...`) and exits non-zero; any other exception is a bug and
keeps its traceback.
"""


class CurateError(Exception):
    """Bad input, config or run-directory state; the message says what is wrong and what to do."""
