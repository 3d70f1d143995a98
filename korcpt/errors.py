"""Typed errors whose messages are fit to show a user as one line.

Library code raises these; tools and ``launch/`` turn them into a one-line message and a non-zero
exit (see :func:`korcpt.cli.run_tool`). Anything else escaping is a bug and keeps its traceback.
"""


class KorcptError(Exception):
    """Base class: a problem with the user's input, files or environment, not a bug in korcpt."""


class ConfigError(KorcptError):
    """A run config (YAML or override) has an unknown key, a wrong type or an impossible value."""


class DataError(KorcptError):
    """An input file (raw source, corpus, shard, manifest) is missing, unreadable or malformed."""


class ModelError(KorcptError):
    """A model or tokenizer cannot be found, loaded or combined with the run's settings."""


class TrainingError(KorcptError):
    """Training had to stop: non-finite losses, a failed checkpoint write, an inconsistent resume."""
