"""The one error type a user sees, and how a failed write becomes one.

Every problem a user can fix (a bad path, a malformed config, an unsupported teacher) raises
`UserError` with one sentence naming the problem and the fix. The CLI prints that sentence and
exits non-zero; anything else is a bug and keeps its traceback.
"""


import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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


@contextmanager
def writing_into(tmp: Path, what: str, fix: str) -> Iterator[None]:
    """Write into the temporary folder `tmp`; if anything fails, remove it, and report a failure of
    the file system (a full disk) as a one-line UserError about `what`, with `fix`."""
    try:
        yield
    except Exception as error:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = write_failure(error)
        if reason is None:
            raise
        raise UserError(f"could not write {what} ({reason}); {fix}") from None
