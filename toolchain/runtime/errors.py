"""One exception type for every user-facing failure: the CLI prints its message, no traceback, and exits 2.

It lives in the runtime, the leaf every other part imports, so a device raises the same errors as a build host."""


class ToolchainError(Exception):
    """A problem the user can fix. The message names the file, line or key and says what to do."""
