"""The one exception type users see: a clear, one-line message, never a stack trace."""


class HdbError(Exception):
    """A problem the user can act on (bad input, missing model, mismatched file, ...)."""
