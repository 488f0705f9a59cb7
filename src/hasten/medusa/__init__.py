"""Medusa: extra decoding heads that draft several tokens from one hidden state.

- `heads.py`: the heads (`MedusaHeads`), their on-disk format, the published layout;
- `drafter.py`: `MedusaDrafter` for the speculative engine, `medusa_drafter(model)`;
- `distill.py`: self-distillation data (`hasten distill`);
- `data.py`: training targets and the hidden-state cache;
- `train.py`: Medusa-1 training (`hasten train medusa`), accuracy, tree for the heads;
- `medusa2.py`: Medusa-2 joint training (`hasten train medusa --joint`);
- `tree_search.py`: trees grown from measured accuracy;
"""

from .drafter import MedusaDrafter, medusa_drafter
from .heads import HeadsConfig, MedusaHeads, load_heads, save_heads

__all__ = ["HeadsConfig", "MedusaDrafter", "MedusaHeads", "load_heads", "medusa_drafter", "save_heads"]
