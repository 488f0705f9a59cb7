"""BitDelta tenants for `hasten serve --delta NAME=PATH`: one base in memory, one route per row.

`tenant_backbone` checks every delta against the base's weights and returns a backbone that
shares all of the base's weights and adds each tenant's packed sign matmuls (`DeltaDense`);
tenant k is route k (`runtime.set_route`), -1 the base alone. The server's batched decoder
sets the route of every step from its rows, so requests of different tenants share one
forward: one base matmul for the whole batch plus a binary matmul per tenant present.
"""

from __future__ import annotations

from pathlib import Path

from ..api import Model
from ..errors import HastenError
from ..models.llama import LlamaModel
from ..models.sources import load_weights
from .delta import check_base, delta_backbone, load


def tenant_backbone(model: Model, tenants: dict[str, Path]) -> LlamaModel:
    """The multi-tenant backbone over `model` for the deltas `tenants` (name -> folder)."""
    if not isinstance(model.backbone, LlamaModel) or model.folder is None:
        raise HastenError("--delta needs the lean Llama runtime (--runtime lean) on a model "
                          "loaded from a folder or GGUF")
    base_sd = load_weights(model.folder)  # for the fingerprint check only; dropped after
    deltas = []
    for name, path in tenants.items():
        delta = load(path)
        check_base(delta, base_sd, f"{model.name} (for tenant {name!r})")
        deltas.append(delta)
    del base_sd
    return delta_backbone(model.backbone, deltas)
