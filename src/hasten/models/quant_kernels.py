"""Matmuls over GGUF quantized blocks (Q4_1, Q8_0) kept as they are in the file.

`block_matmul(x, blocks, kind)` is `x @ W.T` for W the file's dequantized values, exactly (the
numbers gguf's dequantizer gives, bit for bit), without ever holding W in float32:

  - the compiled kernel (`kernels/quant_matmul.cpp`: AVX-512 where the CPU has it, else AVX2
    + FMA + F16C, else scalar loops), built once per machine with torch's C++ extension tools
    into `paths.kernel_root()`; every output row is computed by the same instructions whatever
    the row count, so verify rows equal plain ones bit for bit;
  - else a pure-torch fallback that dequantizes per call (exact weights, slow, the row
    behaviour of the float32 matmul underneath).

torch's own weight-only kernels do not fit (measured on torch 2.13, AMD EPYC and Intel Xeon):
`_weight_int4pack_mm_for_cpu` holds Q4_1 exactly with float32 scales (zero = m + 8 d) but its
float32 path is scalar, ~10x slower than a float32 matmul; with bfloat16 activations it is fast
but its bfloat16 scales cannot hold the file's float16 d and m (weights off by up to 1e-3);
`_weight_int8pack_mm` has one scale per output channel, not one per 32-weight block (Q8_0).
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from pathlib import Path

import torch

from ..paths import kernel_root

BLOCK = 32  # weights per GGUF block (Q4_1, Q8_0)
BLOCK_BYTES = {"Q4_1": 20, "Q8_0": 34}
SOURCE = Path(__file__).with_name("kernels") / "quant_matmul.cpp"
SOURCES = [SOURCE, SOURCE.with_name("q8_activations.cpp")]
HEADERS = [SOURCE.with_name(name) for name in ("q8_activations.h", "schedule.h", "vector_math.h")]

# -fopenmp: at::parallel_for is inline and runs serially without it (measured: 2 threads took
# as long as 1); the extension then links the libgomp torch has already loaded.
CFLAGS = ["-O3", "-march=native", "-fopenmp"]

_lock = threading.Lock()
_module = None
_failure: str | None = None


def dequantize_blocks(blocks: torch.Tensor, kind: str) -> torch.Tensor:
    """[N, K / 32 * bytes] uint8 GGUF blocks -> float32 [N, K], the same bits as gguf's numpy
    dequantizer (d * q is exact in float32, so d * q + m rounds once either way)."""
    n = blocks.shape[0]
    b = blocks.reshape(n, -1, BLOCK_BYTES[kind])
    d = b[..., 0:2].contiguous().view(torch.float16).float()  # [N, nb, 1]
    if kind == "Q8_0":
        q = b[..., 2:].contiguous().view(torch.int8).float()
        return (q * d).reshape(n, -1)
    m = b[..., 2:4].contiguous().view(torch.float16).float()
    nibbles = b[..., 4:]
    q = torch.cat([nibbles & 0x0F, nibbles >> 4], dim=-1).float()  # weights 0..15, 16..31
    return (d * q + m).reshape(n, -1)


def kernel_module():
    """The compiled extension, built on first use (about a minute, once per machine), or None
    when it cannot be built here (no compiler, no ninja, HASTEN_NO_KERNELS=1): callers then use
    the pure-torch fallback. The reason is in `kernel_failure()`."""
    global _module, _failure
    with _lock:
        if _module is None and _failure is None:
            try:
                _module = _build()
            except Exception as exc:  # a missing compiler surfaces as many kinds of error
                _failure = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        return _module


def kernel_failure() -> str | None:
    return _failure


def _build():
    if os.environ.get("HASTEN_NO_KERNELS"):
        raise RuntimeError("HASTEN_NO_KERNELS is set")
    from torch.utils.cpp_extension import load

    folder = kernel_root() / f"quant_matmul-{source_key()}"
    folder.mkdir(parents=True, exist_ok=True)
    built = folder / "quant_matmul.so"
    if built.exists():
        # The folder is named by the sources' contents, flags, torch and CPU, so a build there
        # is this one: import it as it is. (torch's loader would rebuild it for a checkout at
        # another path, since its build file names the sources by path.)
        try:
            return _import_built(built)
        except ImportError:
            pass  # damaged (a build cut short): build again
    else:
        print("hasten: compiling the quantized matmul kernel for this machine (once)...",
              file=sys.stderr, flush=True)
    return load(name="quant_matmul", sources=[str(s) for s in SOURCES], build_directory=str(folder),
                extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"], verbose=False)


def _import_built(path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("quant_matmul", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cpu_id() -> str:
    """The CPU model and flags: `-march=native` code is only valid on the CPU it was built for."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform
        return platform.processor()
    keep = [line for line in text.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def kernel_name() -> str:
    """Which code multiplies compact weights here: "avx512-<source hash>", "avx2-<hash>",
    "scalar-<hash>" (compiled, no vector unit it knows) or "torch" (the fallback). Part of
    measurement cache keys: each computes other bits, so a changed kernel is measured again."""
    module = kernel_module()
    if module is None:
        return "torch"
    return f"{module.simd()}-{source_key()[:8]}"


def vector_kernels() -> bool:
    """Whether the kernels built here are vector code (AVX-512 or AVX2): only then are they
    faster than torch's own matmuls for dense float32 weights."""
    module = kernel_module()
    return module is not None and module.simd() != "scalar"


def fast_int8() -> bool:
    """Whether `q8_matmul` runs vector integer code here (AVX-512 VNNI, or AVX2's two-step
    byte products): then a few extra rows cost little, and int8 drafts pay."""
    module = kernel_module()
    return module is not None and (module.has_vnni() or module.simd() == "avx2")


def source_key() -> str:
    """Names one build: the kernel source, its flags, the torch version and this CPU."""
    return hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES + HEADERS) + " ".join(CFLAGS).encode() +
                          torch.__version__.encode() + _cpu_id().encode()).hexdigest()[:16]


def torch_block_matmul(x2: torch.Tensor, blocks: torch.Tensor, kind: str) -> torch.Tensor:
    """The fallback: the exact weights, dequantized for this call, through a dense matmul."""
    return x2 @ dequantize_blocks(blocks, kind).to(x2.dtype).t()


def block_matmul(x: torch.Tensor, blocks: torch.Tensor, kind: str) -> torch.Tensor:
    """x [..., K] float32 @ W.T with W [N, K] held as GGUF blocks [N, K / 32 * bytes]."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    module = kernel_module() if x.device.type == "cpu" and x.dtype == torch.float32 else None
    if module is not None:
        y = (module.q4_1_matmul if kind == "Q4_1" else module.q8_0_matmul)(x2, blocks)
    else:
        y = torch_block_matmul(x2, blocks, kind)
    return y.reshape(*lead, blocks.shape[0])


# Activations rounded to int8 blocks (kernels/q8_activations.cpp): the kernel's kind codes, in
# `block_step`'s Kind numbering and in its own (0 = Q4_1, 1 = Q8_0).
Q8_KIND_CODES = {"Q4_1": 3, "Q8_0": 4}
_Q8_KIND = {"Q4_1": 0, "Q8_0": 1}


def q8_pack(blocks: torch.Tensor, kind: str, in_features: int) -> torch.Tensor:
    """GGUF blocks [N, K / 32 * bytes] -> the layout `q8_matmul` reads (the same bytes per
    weight; a row with an odd block count gains one zero block)."""
    return kernel_module().q8_pack(blocks.contiguous(), _Q8_KIND[kind], in_features)


def q8_unpack(packed: torch.Tensor, kind: str, in_features: int) -> torch.Tensor:
    """The packed layout -> float32 [N, K]: the file's dequantized weights, bit for bit."""
    return kernel_module().q8_unpack(packed, _Q8_KIND[kind], in_features)


def q8_matmul(x: torch.Tensor, packed: torch.Tensor, kind: str) -> torch.Tensor:
    """x [..., K] float32 with each row rounded to int8 blocks of 32 (llama.cpp's activation
    numerics), @ W.T for W packed by `q8_pack`. Rows never depend on the row count."""
    lead = x.shape[:-1]
    y = kernel_module().q8_matmul(x.reshape(-1, x.shape[-1]).float().contiguous(), packed,
                                  _Q8_KIND[kind])
    return y.reshape(*lead, packed.shape[0])


def dense_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] float32 @ W.T for dense float32 W [N, K], by the compiled kernel (rows
    independent of the row count); callers check `kernel_module()` first."""
    lead = x.shape[:-1]
    y = kernel_module().f32_matmul(x.reshape(-1, x.shape[-1]).contiguous(), w)
    return y.reshape(*lead, w.shape[0])


def quantize_q8_0(w: torch.Tensor) -> torch.Tensor:
    """float [N, K] -> Q8_0 blocks [N, K / 32 * 34] (gguf's quantizer), for `block_matmul`."""
    import gguf
    import numpy as np

    blocks = gguf.quants.quantize(w.detach().float().cpu().numpy(), gguf.GGMLQuantizationType.Q8_0)
    return torch.from_numpy(np.ascontiguousarray(blocks))


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T for a float32 [N, K] w: the compiled kernel where it runs (CPU, float32, K a
    multiple of 32, vector code, no autograd; on AMD EPYC 1.5-3x MKL for a few rows), else torch."""
    cpu = x.device.type == "cpu" and x.dtype == w.dtype == torch.float32
    if (not cpu or not vector_kernels() or w.shape[1] % BLOCK or not w.is_contiguous()
            or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
        return x @ w.t()
    return dense_matmul(x, w)


def logical_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan,
                      scale: float) -> torch.Tensor:
    """`exact_attention` for a float32 plan with `counts` (see `exact_attention.plan_keys`),
    computed by the compiled kernel over the keys where they lie in the cache: q [1, H, T, D]
    -> [1, H, T, D]. Every query reduces over its logical keys in order, whatever the batch."""
    out = kernel_module().logical_attention(q[0].contiguous(), k_cache[0], v_cache[0],
                                            plan.tail_slots, plan.counts, scale, NO_ROWS)
    return out[None]


NO_ROWS = torch.empty(0, dtype=torch.long)  # the kernels' "no cache rows given": row 0


def batched_logical_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              slots: torch.Tensor, counts: torch.Tensor, rows: torch.Tensor,
                              scale: float) -> torch.Tensor:
    """`logical_attention` for queries of many cache rows in one call: q [T, H, 1, D] (one
    token per batch row), k/v [R, KV, capacity, D], query t reads cache row rows[t] at slots[t,
    :counts[t]] -> [T, H, 1, D]. Each query's arithmetic is that of the one-row call."""
    out = kernel_module().logical_attention(q[:, :, 0].transpose(0, 1).contiguous(), k_cache,
                                            v_cache, slots, counts, scale, rows)
    return out.transpose(0, 1)[:, :, None]


def can_fuse_attention(head_dim: int, dtype: torch.dtype) -> bool:
    """Whether `logical_attention` runs for this model: float32, head_dim a multiple of 16,
    and the kernel built here."""
    return dtype == torch.float32 and head_dim % 16 == 0 and head_dim <= 256 and \
        kernel_module() is not None
