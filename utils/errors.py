"""The project's one user-facing error type.

A `UserError` is a problem with what the user gave us (a path, a name, an option, a file) rather
than a bug. The scripts print its message as a single line and exit with status 2; the message
names the file, option or argument at fault and says what would be valid.
"""

__all__ = ["UserError"]


class UserError(Exception):
    """A clear, one-line error about the user's input."""
