"""Is speculative decoding bit-exact on this machine, in this dtype? Measured, not assumed.

Greedy speculative output equals plain greedy output token for token only if every verified
tree node gets exactly the logits a plain step of the same token would get. That depends on
the CPU, the torch build and the dtype (which kernels run, and whether a matmul row depends
on how many rows share the call), so it is checked on the model itself:

- `row_classes`: row 0 of `X @ W` for the model's weight shapes, compared bit for bit as the
  row count M changes; M values giving identical rows form one class.
- `check_exactness`: random prompts and random trees; every node's verify logits against plain
  decoding of its path, bit for bit. This end-to-end check decides "exact: yes / no".

Both are cached per (model, runtime, device, dtype, threads) next to the verify cost curve.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..models.backbone import Backbone
from ..paths import write_json
from .tree import DraftTree, verify_inputs

ROW_COUNTS = (1, 2, 3, 4, 5, 8, 9, 16, 17, 24, 32, 33, 48, 64, 65)


@dataclass
class Exactness:
    exact: bool
    why: str
    nodes_checked: int = 0
    nodes_differing: int = 0


def row_classes(weight, sizes=ROW_COUNTS, trials: int = 16, seed: int = 0,
                dtype: torch.dtype | None = None) -> list[list[int]]:
    """Row counts grouped by the bits of row 0 of `x @ weight` (weight [in, out]) or, for a
    layer, of `layer(x)` (its own kernel: MKL, oneDNN or ours), over `trials` different row-0
    inputs: in half precision a kernel difference shows in the rounded output only now and
    then, so one input is not enough. `dtype`: a layer's input dtype (default: its weights')."""
    if isinstance(weight, torch.Tensor):
        n_in, device, dtype = weight.shape[0], weight.device, weight.dtype
        def apply(x):
            return x @ weight
    else:
        n_in = getattr(weight, "in_features", None) or weight.weight_t.shape[0]
        param = next(iter(weight.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = dtype or (param.dtype if param is not None else torch.float32)
        apply = weight
    g = torch.Generator().manual_seed(seed)
    firsts = torch.randn(trials, n_in, generator=g).to(dtype).to(device)
    results: list[tuple[torch.Tensor, list[int]]] = []
    with torch.inference_mode():
        for m in sizes:
            others = torch.randn(m - 1, n_in, generator=g).to(dtype).to(device)
            rows = torch.stack([apply(torch.cat([first[None], others]))[0] for first in firsts]).cpu()
            for seen, members in results:
                if torch.equal(seen, rows):
                    members.append(m)
                    break
            else:
                results.append((rows, [m]))
    return [members for _, members in results]


@torch.inference_mode()
def check_exactness(backbone: Backbone, trials: int = 3, max_nodes: int = 12,
                    seed: int = 0) -> Exactness:
    """Verify random trees after random prompts and compare every node's logits with plain
    decoding of its path (prefilled once per trial, then rolled back per node). The lean
    runtime is checked with its exact attention on, whatever its current mode."""
    if not hasattr(backbone, "exact"):
        return Exactness(False, "the generic transformers adapter computes verify and plain steps "
                                "with different kernels; use a Llama-family model on the lean "
                                "runtime for exact output")
    before, backbone.exact = backbone.exact, True
    try:
        return _compare_trees(backbone, trials, max_nodes, seed)
    finally:
        backbone.exact = before


def _compare_trees(backbone, trials: int, max_nodes: int, seed: int) -> Exactness:
    rng = random.Random(seed)
    vocab = backbone.vocab_size
    checked = differing = 0
    for _ in range(trials):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(20, 150))]
        n = rng.randint(4, max_nodes)
        parents = [-1] + [rng.randrange(-1, i) for i in range(1, n)]
        tree = DraftTree(torch.tensor([rng.randrange(vocab) for _ in range(n)]),
                         torch.tensor(parents))
        root = rng.randrange(vocab)
        backbone.reset(1, len(prompt) + 2 * max_nodes + 4)
        backbone.forward(torch.tensor([prompt], device=backbone.device))
        backbone.commit()
        past = backbone.length
        verified = backbone.forward(*verify_inputs(tree, root, past, backbone.device)).logits[0]
        backbone.commit(torch.empty(0, dtype=torch.long))
        for node in [-1] + list(range(n)):  # -1: the root itself
            path = [root] + [tree.token_list[i] for i in tree.path_to(node)]
            backbone.truncate(past)
            for token in path:
                logits = backbone.forward(torch.tensor([[token]], device=backbone.device)).logits[0, -1]
                backbone.commit()
            checked += 1
            differing += not torch.equal(logits, verified[node + 1])
    if differing:
        return Exactness(False, f"{differing} of {checked} tree nodes got other logits than plain "
                                "decoding of the same tokens (kernels whose rows depend on the "
                                "row count in this dtype here)", checked, differing)
    return Exactness(True, f"all {checked} tree nodes bit-identical to plain decoding", checked, 0)


def read_cached(path: Path) -> Exactness | None:
    try:
        return Exactness(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def cached_exactness(backbone: Backbone, path: Path) -> Exactness:
    """The check cached at `path`, or measured (seconds) and saved there."""
    cached = read_cached(path)
    if cached is not None:
        return cached
    result = check_exactness(backbone)
    write_json(path, asdict(result))
    return result
