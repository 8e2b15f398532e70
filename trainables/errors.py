"""The one exception type for bad user input: the CLI prints it and exits non-zero, no traceback."""


class UserError(Exception):
    """A problem with what the user gave (a file, a config field, a value), stated so they can fix it."""
