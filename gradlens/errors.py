"""The one exception type gradlens raises for bad input, so the CLI can print it as a single line."""


class GradlensError(Exception):
    """A user-facing error: the message names the file, flag or object at fault and what is wrong with it."""
