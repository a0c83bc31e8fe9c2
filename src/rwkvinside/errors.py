"""The one error type a user sees.

Every problem a user can fix (a bad path, a malformed config, an unsupported teacher) raises
`UserError` with one sentence naming the problem and the fix. The CLI prints that sentence and
exits non-zero; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


def write_failure(error: BaseException) -> str | None:
    """Why a write failed, when it was the file system (full disk, permissions); None for other errors.

    A full disk shows as an OSError, as a RuntimeError of torch.save with the OSError as its context,
    or as a SafetensorError with the system's message in its text."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError):
            return seen.strerror or str(seen)
        seen = seen.__cause__ or seen.__context__
    if type(error).__name__ == "SafetensorError" and "I/O error" in str(error):
        return str(error).split("I/O error:", 1)[1].strip()
    return None
