"""The one exception type gradlens raises for bad input, so the CLI can print it as a single line."""


class GradlensError(Exception):
    """A user-facing error: the message names the file, flag or object at fault and what is wrong with it."""


class GradlensWarning(UserWarning):
    """A result that may not mean what it seems (no learning signal, drifted base weights, an unchecked mask): the
    CLI shows it as one ``gradlens COMMAND: warning: ...`` line, and the provenance keeps it."""
