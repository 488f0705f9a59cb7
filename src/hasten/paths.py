"""Where hasten keeps what it computes once: converted models, downloads, measured costs."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def cache_root() -> Path:
    """`$HASTEN_CACHE`, else the platform's user cache folder + `/hasten`."""
    if os.environ.get("HASTEN_CACHE"):
        return Path(os.environ["HASTEN_CACHE"]).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "hasten"


def kernel_root() -> Path:
    """Where the compiled kernels are built: `$HASTEN_KERNEL_CACHE`, else `cache_root()/kernels`.
    A build's folder is named by its sources, flags, torch and CPU, so caches may share one
    (the tests do: each of their fresh caches would otherwise compile it again, ~1 min)."""
    if os.environ.get("HASTEN_KERNEL_CACHE"):
        return Path(os.environ["HASTEN_KERNEL_CACHE"]).expanduser()
    return cache_root() / "kernels"


def write_json(path: Path, data) -> None:
    """`data` as JSON at `path`, whole or not at all: written beside it, then moved over it (a
    crash or a concurrent reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)
