"""Where hasten keeps what it computes once: converted models, downloads, measured costs."""

from __future__ import annotations

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
