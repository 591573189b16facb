"""The one exception type a user sees: a single line saying what is wrong, where, and what to do;
and `first_line`, the one way an underlying exception is quoted inside such a line.

The CLI prints `str(error)` and exits non-zero; it never shows a traceback for these.
"""


class PuddingError(Exception):
    """A user-facing error: bad input, a missing file, a malformed bundle."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """An exception as one short line: its first non-blank line (whitespace collapsed), else its
    type name, cut to `limit` characters."""
    lines = [" ".join(line.split()) for line in str(e).splitlines()]
    text = next((line for line in lines if line), type(e).__name__)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def out_of_memory(e: BaseException):
    """The line for a run that ran out of memory (MLX raises RuntimeError, e.g. "cudaMallocAsync ... out of
    memory" on CUDA, "[metal::malloc] ..." on a Mac), or None for any other error: the run was too large for
    the device, or shared it, which is no bug to show a traceback for."""
    text = str(e).lower()
    if isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and ("out of memory" in text or "malloc" in text)):
        return (f"out of memory ({first_line(e, 120)}): lower --batch-size or --max-tokens, or close what else "
                "uses the device")
    return None
