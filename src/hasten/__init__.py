"""hasten: lossless speculative decoding for language models."""

__version__ = "0.1.0"


def load(*args, **kwargs):
    """Load a model; see `hasten.api.load`. Imported lazily so `import hasten` stays cheap."""
    from .api import load as _load
    return _load(*args, **kwargs)
