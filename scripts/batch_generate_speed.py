"""`generate_batch` (what `hasten distill` runs) before / after continuous batching, interleaved:
the padded batch against the continuous one on the same prompts, wall and CPU time.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/batch_generate_speed.py DTYPE ROWS NEW [REPEATS]
"""

import sys
import time

import hasten
from hasten.decoding import generate as g

TOPICS = ["the sea", "a lost key", "winter", "a clock", "two cooks", "a lighthouse", "a train",
          "Mars", "chess", "a map", "a storm", "a library", "a kite", "a village", "a radio", "snow"]


def main():
    dtype, rows, new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    repeats = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    m = hasten.load(dtype=dtype, progress=False)
    qs = [f"{verb} {t}." for verb in ("Write a poem about", "Explain", "Tell me a fact about",
                                      "Describe") for t in TOPICS][:rows]
    ids = [m.encode([{"role": "user", "content": q}]) for q in qs]
    params = g.SamplingParams()
    for _ in range(repeats):
        padded = None
        for name in ("padded (before)", "continuous (after)"):
            t, c = time.perf_counter(), time.process_time()
            if padded is None:
                out = g._padded_batch(m.backbone, ids, new, params, m.stop_ids, None, 0, m.max_positions)
            else:
                out = g._continuous_batch(m.backbone, ids, new, params, m.stop_ids, None, m.max_positions)
            wall, cpu = time.perf_counter() - t, time.process_time() - c
            n = sum(map(len, out))
            print(f"{dtype} rows={rows} new={new} {name}: {n} tokens, {n / wall:.1f} tok/s, "
                  f"{n / cpu:.1f} tok per CPU-s", flush=True)
            if padded is None:
                padded = out
            else:
                print(f"  rows with the padded batch's tokens: {sum(a == b for a, b in zip(padded, out))}"
                      f" of {len(out)}", flush=True)


if __name__ == "__main__":
    main()
