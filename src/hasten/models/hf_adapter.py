"""The generic runtime: the `Backbone` contract over any `transformers` causal LM.

The lean runtime (`llama.py`) ports one architecture family for speed; this adapter trades
speed for reach. Gemma 3, GPT-2, Phi and everything else `AutoModelForCausalLM` loads work
here, because all a speculative verifier needs from a model is three things every modern
`transformers` model accepts:

- `position_ids`: tree tokens at the same depth share a position (RoPE and learned absolute
  embeddings alike read it);
- a custom 4D attention mask, which `transformers` passes to the attention kernels as is.
  It is additive float ([B, 1, T, L+T], 0 = attend, dtype minimum = blocked), because the
  eager kernels *add* the mask to the scores while SDPA accepts either form;
- a `DynamicCache`, whose per-layer key/value tensors we trim and gather ourselves.

Sliding-window layers (Gemma 2/3, Mistral, ...) would normally get a truncated cache and a
windowed mask built by `transformers`. A custom mask bypasses that, so the adapter keeps the
whole history in every layer and applies the window itself, from the positions of the
cached tokens: hybrid models get one mask per layer type (`{"full_attention": ...,
"sliding_attention": ...}`, the mapping their forward accepts in place of a mask).

See `backbone.py` for the cache contract (pending K/V until `commit(keep)`).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from ..errors import ContextFullError, HastenError, ModelSourceError
from .backbone import StepOutput, check_step, check_taps
from .llama import causal_mask

_SUPPORTED_LAYER_TYPES = {"full_attention", "sliding_attention"}


class HFBackbone:
    """A `transformers` causal LM behind the `Backbone` interface.

    The model is put in eval mode and run without gradients. `hidden` in the step output is
    the last entry of `output_hidden_states`: the final hidden state after the last norm,
    the input of the LM head.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval()
        self.config = model.config.get_text_config(decoder=True)
        self.vocab_size = int(self.config.vocab_size)
        self.max_positions = int(getattr(self.config, "max_position_embeddings", None) or 1 << 30)
        self.window, self.layer_types = _attention_layout(self.config)
        self._accepts_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.capacity = 0
        self.length = 0
        self._pending = 0
        self._batch = 0
        self._cache = None
        self._positions = None  # [B, length + pending]: the position of every cached entry

    @classmethod
    def from_folder(cls, folder: str | Path, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", gguf_file: str | None = None,
                    attn_implementation: str | None = None) -> "HFBackbone":
        """Load `AutoModelForCausalLM.from_pretrained(folder)` (a GGUF inside it with `gguf_file`).

        SDPA is the default attention: it takes our float mask and is the faster kernel on a
        CPU. Models whose attention scores are soft-capped (Gemma 2) need eager, which
        `transformers` picks for them when `attn_implementation` is left to it.
        """
        from transformers import AutoModelForCausalLM

        folder = Path(folder)
        if not folder.exists():
            raise ModelSourceError(f"model folder {folder} does not exist")
        kwargs = {"dtype": dtype}
        if gguf_file is not None:
            kwargs["gguf_file"] = gguf_file
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        try:
            model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
        except (OSError, ValueError, KeyError) as err:
            raise ModelSourceError(f"transformers could not load {folder}: {err}") from err
        return cls(model.to(device))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # ---- cache ---------------------------------------------------------------------------

    def reset(self, batch_size: int = 1, capacity: int | None = None) -> None:
        from transformers import DynamicCache

        # No config on purpose: a config would give sliding layers a truncating cache
        # (see the module docstring); plain layers keep everything and we mask instead.
        self._cache = DynamicCache()
        self.capacity = capacity or self.capacity or min(self.max_positions, 4096)
        self._batch, self.length, self._pending = batch_size, 0, 0
        self._positions = torch.zeros(batch_size, 0, dtype=torch.long, device=self.device)

    def commit(self, keep: torch.Tensor | None = None) -> None:
        length, pending = self.length, self._pending
        if keep is None:
            keep = torch.arange(pending, device=self.device)
        keep = torch.as_tensor(keep, dtype=torch.long, device=self.device).reshape(-1)
        if keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= pending):
            raise IndexError(f"commit indices must lie in [0, {pending})")
        if not torch.equal(keep, torch.arange(pending, device=self.device)):
            index = torch.cat([torch.arange(length, device=self.device), length + keep])
            for layer in self._cache_layers():
                layer.keys = layer.keys.index_select(2, index)
                layer.values = layer.values.index_select(2, index)
            self._positions = self._positions.index_select(1, index)
        self.length += keep.numel()
        self._pending = 0

    def _cache_layers(self):
        return [layer for layer in self._cache.layers
                if getattr(layer, "is_initialized", False) and layer.keys is not None]

    def _drop_pending(self) -> None:
        """Forget uncommitted K/V, so that a second `forward` replaces the first as it does
        in the static cache of the lean runtime (a `DynamicCache` would append instead)."""
        if self._pending:
            for layer in self._cache_layers():
                layer.keys = layer.keys[:, :, :self.length]
                layer.values = layer.values[:, :, :self.length]
            self._positions = self._positions[:, :self.length]
            self._pending = 0

    # ---- forward -------------------------------------------------------------------------

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, last_only: bool = False,
                taps: tuple[int, ...] = ()) -> StepOutput:
        layers = int(self.config.num_hidden_layers)
        check_taps(taps, layers)
        if layers - 1 in taps:  # transformers returns the last layer's output normed only
            raise HastenError(f"the transformers adapter cannot tap the last layer ({layers - 1}) "
                              "before the final norm; use a head over other layers")
        if self._cache is None:
            self.reset(batch_size=input_ids.shape[0])
        self._drop_pending()
        b, t = input_ids.shape
        past = self.length
        check_step(past, t, self.capacity, b, self._batch)
        input_ids = input_ids.to(self.device)
        if positions is None:
            positions = torch.arange(past, past + t, device=self.device).expand(b, t)
        positions = positions.to(self.device, torch.long).expand(b, t)
        if int(positions.max()) >= self.max_positions:
            raise ContextFullError(f"position {int(positions.max())} is beyond the model's "
                                   f"{self.max_positions} positions")
        if mask is None:
            mask = causal_mask(past, t, self.device)
        mask = mask.to(self.device, torch.bool).expand(b, t, past + t)
        key_positions = torch.cat([self._positions, positions], dim=1)

        kwargs = {"logits_to_keep": 1} if last_only and self._accepts_logits_to_keep else {}
        out = self.model(input_ids=input_ids, position_ids=positions,
                         attention_mask=self._attention_mask(mask, positions, key_positions),
                         past_key_values=self._cache, use_cache=True, output_hidden_states=True,
                         **kwargs)
        self._positions = key_positions
        self._pending = t
        logits = out.logits[:, -1:] if last_only else out.logits
        # hidden_states[i + 1] is layer i's output (entry 0: the embeddings).
        tapped = torch.cat([out.hidden_states[i + 1] for i in taps], -1) if taps else None
        return StepOutput(logits=logits, hidden=out.hidden_states[-1], taps=tapped)

    __call__ = forward

    def _attention_mask(self, mask: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor):
        """The boolean [B, T, L+T] mask as what the model's forward expects: one additive
        [B, 1, T, L+T] mask, or one per layer type for models mixing full and sliding layers."""
        masks = {"full_attention": mask}
        if self.window is not None:
            # A sliding layer sees keys fewer than `window` positions back (itself included).
            near = (q_pos[:, :, None] - k_pos[:, None, :]) < self.window
            masks["sliding_attention"] = mask & near
        additive = {kind: _additive(m, self.dtype) for kind, m in masks.items()
                    if kind in self.layer_types}
        if len(additive) == 1:
            return next(iter(additive.values()))
        return additive


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean [B, T, K] (True = attend) -> float [B, 1, T, K]: 0 where allowed, else the most
    negative finite value (not -inf, which turns a fully masked row into NaNs)."""
    blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=mask.device)
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(mask, zero, blocked).unsqueeze(1)


def _attention_layout(config) -> tuple[int | None, set[str]]:
    """(sliding window or None, the set of attention layer types) as `transformers` reads them:
    `layer_types` when the config lists them, else every layer slides if `sliding_window` is set."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is None:
        types = ["sliding_attention" if window is not None else "full_attention"]
    types = set(types)
    unsupported = types - _SUPPORTED_LAYER_TYPES
    if unsupported:
        raise ModelSourceError(f"layer types {sorted(unsupported)} are not supported by the "
                               "generic adapter (only full and sliding-window attention)")
    if "sliding_attention" not in types:
        window = None
    elif window is None:
        raise ModelSourceError("the config has sliding-window layers but no sliding_window size")
    return window, types
