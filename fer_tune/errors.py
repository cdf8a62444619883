"""Errors a user can cause. The CLI prints their message as one line and exits non-zero."""


class UserError(Exception):
    """A problem with the user's input (a path, a flag, a file). The message is the whole story:
    it names the file or flag, what is wrong, and what to do."""


def first_line(exc: BaseException) -> str:
    """An exception's message on one line (its first), or its type name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class RunFailed(RuntimeError):
    """A training run could not finish: its loss diverged, or its worker died. The CLI prints the
    message as one line (it names the run) and exits 1; the command leaves no partial output."""
