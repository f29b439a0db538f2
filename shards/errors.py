"""The one exception type the CLI turns into a one-line error (no traceback, exit code 2)."""


class UserError(Exception):
    """Bad input or configuration. The message names the problem and the fix, in one line."""
