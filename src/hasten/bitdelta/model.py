"""A `hasten.api.Model` for a base model plus a BitDelta: what `hasten generate --delta` runs.

`with_delta(model, path)` checks that `model` is the base the delta was compressed from and
returns a new Model with the same tokenizer whose backbone either shares the base's weights
and adds the packed sign matmuls (`merged=False`, the serving path: the base stays usable and
unchanged) or holds merged weights W_base + alpha * sign (`merged=True`: one model, base speed).
Speculative decoding works on either, like on any backbone.
"""

from __future__ import annotations

from pathlib import Path

from ..api import Model
from ..errors import HastenError
from ..models.llama import LlamaModel, build_llama
from ..models.sources import load_weights
from .delta import Delta, check_base, delta_backbone, load, merged_state_dict


def with_delta(model: Model, path: str | Path | Delta, merged: bool = False,
               initial: bool = False) -> Model:
    """`model` + the delta at `path`. `initial`: the undistilled scales (mean |delta|)."""
    if not isinstance(model.backbone, LlamaModel) or model.folder is None:
        raise HastenError("BitDelta needs the lean Llama runtime (--runtime lean) on a model "
                          "loaded from a folder or GGUF")
    delta = path if isinstance(path, Delta) else load(path)
    base_sd = load_weights(model.folder)
    check_base(delta, base_sd, model.name)
    base = model.backbone
    if merged:
        backbone = build_llama(base.config, merged_state_dict(base_sd, delta, initial, base.dtype),
                               base.dtype, base.device)
    else:
        backbone = delta_backbone(base, [delta], initial)
    name = delta.meta["finetune"].get("name") or "delta"
    out = Model(backbone, model.tokenizer, f"{model.name}+{name}", model.max_positions,
                model.stop_ids, folder=model.folder)
    out.fingerprint = f"{model.fingerprint}-bitdelta-{delta.meta['finetune']['fingerprint'][:12]}"
    return out
