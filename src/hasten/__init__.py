"""hasten: lossless speculative decoding for language models."""

__version__ = "0.1.0"


def load(*args, **kwargs):
    """Load a model; see `hasten.api.load`. Imported lazily so `import hasten` stays cheap."""
    from .api import load as _load
    return _load(*args, **kwargs)


def __getattr__(name: str):
    if name == "DraftSpec":  # `hasten.DraftSpec("rest", datastore=...)` for `draft=`
        from .drafters.spec import DraftSpec
        return DraftSpec
    raise AttributeError(f"module 'hasten' has no attribute {name!r}")
