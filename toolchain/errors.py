"""One exception type for every user-facing failure: the CLI prints its message, no traceback, and exits 2."""


class ToolchainError(Exception):
    """A problem the user can fix. The message names the file, line or key and says what to do."""
