"""The one error type a user sees.

Every problem a user can fix (a bad path, a malformed config, an unsupported teacher) raises
`UserError` with one sentence naming the problem and the fix. The CLI prints that sentence and
exits non-zero; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""
