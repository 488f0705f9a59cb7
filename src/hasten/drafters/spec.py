"""One description of "which drafter, with which options", shared by every entry point.

`hasten generate`, `hasten serve`, `hasten bench` and the Python API all turn their inputs
into a `DraftSpec`, validated here once; `build_drafter` (in `__init__`) turns a spec into a
drafter, and `Model.drafter(spec)` caches the result per model. A spec is frozen and
hashable, so equal specs share one built drafter.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace

from ..errors import HastenError

DRAFTERS = ("none", "lookup", "model", "rest", "medusa", "eagle")


@dataclass(frozen=True)
class DraftSpec:
    name: str = "none"
    draft_model: str | None = None  # model: a smaller model sharing the tokenizer
    draft_layers: int | None = None  # model: self-draft from the target's first layers
    draft_depth: int = 4  # model: tokens drafted per step
    datastore: str | None = None  # rest: a file from `hasten datastore build`
    medusa_heads: str | None = None  # medusa: a heads folder (default: found for the model)
    eagle_head: str | None = None  # eagle: a head folder (default: found for the model)

    def __post_init__(self):
        if self.name not in DRAFTERS:
            raise HastenError(f"unknown drafter {self.name!r}; choose one of {', '.join(DRAFTERS)}")
        if self.draft_layers is not None and (not isinstance(self.draft_layers, int)
                                              or self.draft_layers < 1):
            raise HastenError(f"--draft-layers must be a whole number >= 1, got {self.draft_layers!r}")
        if not isinstance(self.draft_depth, int) or self.draft_depth < 1:
            raise HastenError(f"--draft-depth must be a whole number >= 1, got {self.draft_depth!r}")
        if self.name == "rest" and not self.datastore:
            raise HastenError("the rest drafter needs a datastore: --datastore PATH (API: "
                              "DraftSpec('rest', datastore=PATH); build one with "
                              "`hasten datastore build`)")
        for option in ("draft_model", "datastore", "medusa_heads", "eagle_head"):
            value = getattr(self, option)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise HastenError(f"{option} must be a path or model spec, got {value!r}")
        if self.datastore is not None:  # a path, normalised so equal files give equal specs
            object.__setattr__(self, "datastore", os.fspath(self.datastore))
        for option in ("medusa_heads", "eagle_head"):
            if getattr(self, option) is not None:
                object.__setattr__(self, option, os.fspath(getattr(self, option)))

    @classmethod
    def of(cls, name: str | None = None, **options) -> DraftSpec:
        """A spec from a name and keyword options, naming any option that does not exist."""
        known = {f.name for f in fields(cls)} - {"name"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise HastenError(f"unknown drafter option(s) {', '.join(unknown)}; known: "
                              f"{', '.join(sorted(known))}")
        return cls(name or "none", **{k: v for k, v in options.items() if v is not None})

    def named(self, name: str | None) -> DraftSpec:
        """The same options for another drafter (a server request picking its own)."""
        if name is None or name == self.name:
            return self
        if name == "rest" and not self.datastore:
            raise HastenError("the rest drafter needs a datastore, and this server was started "
                              "without one (hasten serve --datastore PATH)")
        return replace(self, name=name)

    @property
    def plain(self) -> bool:
        return self.name == "none"
