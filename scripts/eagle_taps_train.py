"""Experiment: EAGLE-1 input (final hidden) vs EAGLE-3-like input (norm'd residuals after layers
2/15/27, reduced 3d -> d) on the same data, steps and seed; held-out top-1 agreement per depth (step 2 of 2, see
eagle_taps_features.py):

    HASTEN_TAPS_DIR=/tmp/e3 python scripts/eagle_taps_train.py final 1
    HASTEN_TAPS_DIR=/tmp/e3 python scripts/eagle_taps_train.py taps 1

Both heads start from the same seed; the taps head's reduction starts as "take the high layer"
(each tap RMS-normalised first: their scales differ ~10x). Losses as `hasten train eagle`
(feature regression + token cross-entropy against the target, one unrolled step)."""
import os, sys, time, random, numpy as np, torch, hasten
from types import SimpleNamespace
from torch import nn
from hasten.eagle.head import EagleHead, EagleConfig
from hasten.eagle.train import EagleTrainConfig, eagle_loss, lr_at, _use_bf16_autocast
from hasten.eagle.data import frequent_tokens
from hasten.medusa.data import batches_by_length
from hasten.medusa.heads import lm_head_weight
from hasten.eagle.drafter import embedding_weight
torch.set_num_threads(2)
DIR = os.environ.get("HASTEN_TAPS_DIR", "/tmp/e3")
variant, epochs = sys.argv[1], float(sys.argv[2])
model = hasten.load(progress=False); bb = model.backbone; d = bb.config.hidden_size
toks = np.load(DIR + "/tokens.npy"); final = np.load(DIR + "/final.npy", mmap_mode="r")
taps = np.load(DIR + "/taps.npy", mmap_mode="r"); index = np.load(DIR + "/index.npy")
HOLD = 100; train_idx, held_idx = list(range(len(index) - HOLD)), list(range(len(index) - HOLD, len(index)))
vocab = frequent_tokens(SimpleNamespace(tokens=toks, index=index[train_idx]), 8192)

class Head3(EagleHead):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.reduce = nn.Linear(3 * d, d, bias=False)
        with torch.no_grad():
            self.reduce.weight.zero_(); self.reduce.weight[:, 2 * d:] = torch.eye(d)
    def fuse(self, embeds, features):
        if features.shape[-1] == 3 * d:
            parts = features.float().view(*features.shape[:-1], 3, d)
            parts = parts * torch.rsqrt(parts.pow(2).mean(-1, keepdim=True) + 1e-5)
            features = self.reduce(parts.flatten(-2).to(embeds.dtype))
        return super().fuse(embeds, features)

cfg = EagleTrainConfig(epochs=epochs, lr=1e-3, unroll=1)
torch.manual_seed(0)
head = (Head3 if variant == "taps" else EagleHead)(EagleConfig.like(bb.config, 8192))
embed = embedding_weight(bb).detach().float(); vw = lm_head_weight(bb).detach().float()[vocab]
src = taps if variant == "taps" else final

def batch(ids):
    """`training_batch`'s dict, with the head's input features (`src`) beside the targets."""
    w = max(int(index[i][1]) for i in ids)
    tk = np.zeros((len(ids), w + cfg.unroll), np.int64); inp = np.zeros((len(ids), w, src.shape[1]), np.float32)
    tf = np.zeros((len(ids), w, d), np.float32)
    for r, i in enumerate(ids):
        s, L, _ = (int(x) for x in index[i]); tk[r, :L] = toks[s:s + L]; inp[r, :L] = src[s:s + L]; tf[r, :L] = final[s:s + L]
    return {"tokens": torch.from_numpy(tk), "features": torch.from_numpy(tf), "inputs": torch.from_numpy(inp),
            "lengths": torch.tensor([int(index[i][1]) for i in ids]), "prompts": torch.tensor([int(index[i][2]) for i in ids])}

def loss_of(b, train=True):
    return eagle_loss(head, b, embed, vw, cfg, train)

def evaluate():
    head.eval(); sums, cnt = {}, {}
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=_use_bf16_autocast(torch.device("cpu"))):
        for bi in batches_by_length([int(index[i][1]) for i in held_idx], 8192):
            _, st = loss_of(batch([held_idx[i] for i in bi]), train=False)
            for k, v in st.items():
                if k.startswith("acc"): n = st["n" + k[3:]]; sums[k] = sums.get(k, 0) + v * n; cnt[k] = cnt.get(k, 0) + n
    head.train(); return {k: round(sums[k] / cnt[k], 4) for k in sorted(sums)}

batches = batches_by_length([int(index[i][1]) for i in train_idx], cfg.batch_tokens)
total = int(len(batches) * cfg.epochs); params = list(head.parameters())
opt = torch.optim.AdamW(params, lr=cfg.lr); step = 0; t0 = time.time(); auto = _use_bf16_autocast(torch.device("cpu"))
print(variant, "train tokens", int(sum(index[i][1] for i in train_idx)), "steps", total, flush=True)
while step < total:
    order = list(range(len(batches))); random.Random(step // len(batches)).shuffle(order)
    for b in order:
        if step >= total: break
        for g in opt.param_groups: g["lr"] = lr_at(step, total, cfg)
        with torch.autocast("cpu", torch.bfloat16, enabled=auto):
            loss, st = loss_of(batch([train_idx[i] for i in batches[b]]))
        opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step(); step += 1
        if step % 50 == 0: print(step, round(float(loss), 3), {k: round(v, 3) for k, v in st.items() if k.startswith("acc")}, f"{time.time()-t0:.0f}s", flush=True)
        if step % 200 == 0 or step == total: print("heldout", step, evaluate(), flush=True)
torch.save(head.state_dict(), f"{DIR}/head_{variant}.pt")
print("done", time.time() - t0)
