"""The one exception type for mistakes a user can fix (bad file, bad flag, prompt too long).

The CLI prints such an error as a single line and exits non-zero; anything else is a bug and keeps
its traceback.
"""


class LlamarunError(Exception):
    """A user-facing error: the message says what is wrong and what to do."""
