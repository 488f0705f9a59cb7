"""Experiment (session 13), step 1 of 2: does an EAGLE-3-like input (the residual stream after a
low, a middle and a high layer) predict the target better than EAGLE-1's last hidden state?

    HASTEN_TAPS_DIR=/tmp/e3 python scripts/eagle_taps_features.py 1600   # ShareGPT exchanges

Writes, for the default model (its default plan, batched teacher forcing): tokens.npy,
final.npy (the last hidden state after the final norm, float16), taps.npy (the residuals after
layers 2, 15 and 27 side by side, float16) and index.npy (start, length, prompt length).
Then `scripts/eagle_taps_train.py final|taps EPOCHS`."""
import os, sys, time, numpy as np, torch, hasten
from hasten.eagle.data import sharegpt_records
from hasten.medusa.data import batches_by_length
torch.set_num_threads(2)
DIR = os.environ.get("HASTEN_TAPS_DIR", "/tmp/e3")
os.makedirs(DIR, exist_ok=True)
N = int(sys.argv[1]); TAPS = [2, 15, 27]
model = hasten.load(progress=False)
bb = model.backbone
enc = lambda text, chat: model.encode(text) if chat else model.tokenizer.encode(text, add_special_tokens=False)
recs = sharegpt_records(enc, model.stop_ids[0], N, 512, progress=False)
lengths = [len(r["prompt_ids"]) + len(r["answer_ids"]) for r in recs]
off = np.concatenate([[0], np.cumsum(lengths)]); tot = int(off[-1]); d = bb.config.hidden_size
print("records", len(recs), "tokens", tot, flush=True)
toks = np.zeros(tot, np.int32); final = np.zeros((tot, d), np.float16); taps = np.zeros((tot, 3 * d), np.float16)
for i, r in enumerate(recs): toks[off[i]:off[i+1]] = r["prompt_ids"] + r["answer_ids"]
cap = {}
for j, l in enumerate(TAPS):  # the residual stream after block l
    bb.blocks[l].register_forward_hook(lambda m, a, o, j=j: cap.__setitem__(j, o))
t0 = time.time(); done = 0
with torch.inference_mode():
    for batch in batches_by_length(lengths, 4096):
        w = max(lengths[i] for i in batch)
        ids = torch.zeros(len(batch), w, dtype=torch.long)
        for r, i in enumerate(batch): ids[r, :lengths[i]] = torch.tensor(toks[off[i]:off[i+1]])
        bb.reset(len(batch), w + 1)
        out = bb.forward(ids, last_only=True)
        for r, i in enumerate(batch):
            L = lengths[i]
            final[off[i]:off[i+1]] = out.hidden[r, :L].float().numpy()
            taps[off[i]:off[i+1]] = torch.cat([cap[j][r, :L] for j in range(3)], -1).float().numpy()
        done += sum(lengths[i] for i in batch)
        print(f"\r{done}/{tot} {done/(time.time()-t0):.0f} tok/s", end="", flush=True)
np.save(DIR + "/tokens.npy", toks); np.save(DIR + "/final.npy", final); np.save(DIR + "/taps.npy", taps)
np.save(DIR + "/index.npy", np.stack([off[:-1], lengths, [len(r["prompt_ids"]) for r in recs]], 1).astype(np.int64))
print("\ndone", time.time() - t0)
