"""The one exception a user can cause. The CLI prints its message as one line and exits 2;
everything else is a bug and keeps its traceback."""


class UserError(Exception):
    """Bad input, a missing file, a store or index made differently than asked: one line."""
