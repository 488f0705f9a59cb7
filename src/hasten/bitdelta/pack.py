"""Sign bits: packing, unpacking, and a matmul that reads the packed bits directly.

Layout (what `delta.safetensors` stores for each block linear weight): for a Hugging Face
weight W of shape [out, in] (nn.Linear's layout), the sign of delta = W_ft - W_base is one bit
per element, bit 1 = positive (+1), bit 0 = zero or negative (-1). Each row is packed along
the input dimension, 8 elements per byte, little-endian within the byte: element `8*g + j` of
a row is bit `j` (value `1 << j`) of byte `g`. A row of `in` elements takes `ceil(in / 8)`
bytes (the padding bits of the last byte are 0), so the packed tensor is uint8
[out, ceil(in / 8)]. Rows stay rows, so fusing q/k/v or gate/up is a concatenation of packed
tensors along dim 0.

`sign_matmul(x, packed, in_features)` computes x @ S.T (S the +-1 matrix). On a CPU where the
compiled kernel builds (`models/kernels/quant_matmul.cpp`, `sign_matmul`), up to
`KERNEL_MAX_ROWS` rows go through it: it reads the bits as lane masks (x @ S.T = 2 * the sum
of x where the bit is 1 - sum(x)), accumulates in float32, and gives each row the same bits
whatever the row count, so verify rows equal plain-step rows. Otherwise, for a few rows of x it
never materialises S: each group of 8 inputs is multiplied once by all 256 sign patterns (a
[256, G] table of partial sums per row, G = in / 8), and each output sums, over the groups, the
partial sum its byte selects (one `gather` per row of x), reading one byte per 8 weights. For
more rows (long prefills) it unpacks blocks of S to +-1 and multiplies. Every path is exact up
to float summation order.
"""

from __future__ import annotations

import torch

from ..models.quant_kernels import kernel_module

_BITS = torch.arange(8, dtype=torch.uint8)


def pack_signs(delta: torch.Tensor) -> torch.Tensor:
    """uint8 [out, ceil(in / 8)]: bit j of byte g of row r is delta[r, 8g + j] > 0."""
    if delta.dim() != 2:
        raise ValueError(f"expected a 2-D weight delta, got shape {tuple(delta.shape)}")
    out, n = delta.shape
    groups = (n + 7) // 8
    bits = torch.zeros(out, groups * 8, dtype=torch.uint8)
    bits[:, :n] = (delta > 0).to(torch.uint8)
    return (bits.view(out, groups, 8) << _BITS).sum(-1, dtype=torch.uint8)


def sign_table(dtype=torch.float32, device=None) -> torch.Tensor:
    """[256, 8]: row b holds the +-1 signs that byte value b encodes."""
    bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
    return (bits * 2 - 1).to(dtype=dtype, device=device)


def unpack_signs(packed: torch.Tensor, in_features: int, dtype=torch.float32) -> torch.Tensor:
    """The +-1 matrix [out, in_features] that `packed` encodes."""
    out, groups = packed.shape
    if not (groups - 1) * 8 < in_features <= groups * 8:
        raise ValueError(f"{groups} bytes per row cannot hold {in_features} signs")
    table = sign_table(dtype, packed.device)
    return table[packed.long()].reshape(out, groups * 8)[:, :in_features]


# Up to this many rows of x the lookup gather wins; above it, unpacking blocks of S and
# multiplying them (the unpacking cost is shared by all rows) does. Measured on a 2-core EPYC,
# one thread, 3072 x 576: 1 row 0.32 ms vs 1.9 ms, 4 rows 1.1 vs 1.9, 8 rows 2.2 vs 2.1.
GATHER_MAX_ROWS = 6
# Up to this many rows the compiled kernel runs (decode steps, verify trees, batches); longer
# prefills unpack, where a dense matmul over the unpacked block is faster than row by row.
KERNEL_MAX_ROWS = 128
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # it sums in float32


def _kernel_runs(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in _KERNEL_DTYPES and kernel_module() is not None


def invariant_rows(x: torch.Tensor) -> int:
    """The most rows of x one `sign_matmul` call takes on a path whose every row is computed
    the same whatever the row count (the compiled kernel, else the gather): callers that must
    not let a row depend on its company split larger batches into calls of this size."""
    return KERNEL_MAX_ROWS if _kernel_runs(x) else GATHER_MAX_ROWS


def sign_matmul(x: torch.Tensor, packed: torch.Tensor, in_features: int,
                block: int = 1024) -> torch.Tensor:
    """x @ S.T for S = unpack_signs(packed, in_features), from the packed bits.

    x: [..., in_features]; returns [..., out] in x's dtype. `block` output rows at a time
    bound the unpacked temporaries."""
    out, groups = packed.shape
    lead = x.shape[:-1]
    xs = x.reshape(-1, x.shape[-1])
    if xs.shape[0] <= KERNEL_MAX_ROWS and _kernel_runs(x):
        y = kernel_module().sign_matmul(xs.float().contiguous(), packed.contiguous())
        return y.to(x.dtype).view(*lead, out)
    if xs.shape[0] > GATHER_MAX_ROWS:
        y = torch.cat([xs @ unpack_signs(packed[s:s + block], in_features, x.dtype).t()
                       for s in range(0, out, block)], dim=-1)
        return y.view(*lead, out)
    if groups * 8 != in_features:  # pad the input: padding bits meet zeros
        xs = torch.nn.functional.pad(xs, (0, groups * 8 - in_features))
    rows = xs.shape[0]
    # partial[r, b, g] = sum_j x[r, 8g + j] * sign_j(b): all 256 signed sums of each group.
    partial = (sign_table(x.dtype, x.device) @ xs.view(rows, groups, 8).transpose(1, 2))
    index = packed.long()  # [out, G]: byte values pick rows of partial[r], column by column
    y = torch.stack([partial[r].gather(0, index).sum(1) for r in range(rows)])
    return y.view(*lead, out)
