"""Errors a user can cause. The CLI prints their message as one line and exits non-zero."""


class UserError(Exception):
    """A problem with the user's input (a path, a flag, a file). The message is the whole story:
    it names the file or flag, what is wrong, and what to do."""
