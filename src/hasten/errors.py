"""Errors a user can act on. Each message says what went wrong and what to do."""


class HastenError(Exception):
    """Base class: the CLI prints these without a traceback."""


class ModelSourceError(HastenError):
    """A model spec that cannot be resolved or read (missing, corrupt, unsupported)."""


class ContextFullError(HastenError):
    """The KV cache has no room for the tokens a step would add."""
