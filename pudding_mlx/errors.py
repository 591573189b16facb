"""The one exception type a user sees: a single line saying what is wrong, where, and what to do.

The CLI prints `str(error)` and exits non-zero; it never shows a traceback for these.
"""


class PuddingError(Exception):
    """A user-facing error: bad input, a missing file, a malformed bundle."""
