"""The kernels' other builds, which this CPU's own build may never compile, built here and run:
the scalar branches (-march=x86-64-v2: no AVX2), for any CPU, and the 8-lane AVX2 branches
(-march=x86-64-v3: AVX2 + FMA + F16C, AMD Zen 1-3 and Intel before Ice Lake), where this CPU
runs them. Each must compute the same products as the reference (other bits are allowed: its
own sums in order) with rows independent of the row count; the int8-activation matmul gives
the scalar reference's bits exactly (integer block sums, then the same float32 operations).
A redeclaration in a scalar branch once went unnoticed, and such a machine would have fallen
back to the slow pure-torch path (~1 min: a build)."""

import shutil
from pathlib import Path

import pytest
import torch

from hasten.models import quant_kernels as qk
from test_compact import file_blocks
from test_q8_activations import rounded

BUILDS = {"scalar": "x86-64-v2", "avx2": "x86-64-v3"}


def cpu_runs_avx2() -> bool:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return {"avx2", "fma", "f16c"} <= set(flags)


def build(tmp_path_factory, name: str):
    if shutil.which("g++") is None or shutil.which("ninja") is None:
        pytest.skip("no g++ / ninja here")
    if name == "avx2" and not cpu_runs_avx2():
        pytest.skip("this CPU has no AVX2 + FMA + F16C")
    from torch.utils.cpp_extension import load
    folder = tmp_path_factory.mktemp(f"{name}-kernels")
    module = load(name=f"quant_matmul_{name}", sources=[str(s) for s in qk.SOURCES],
                  build_directory=str(folder), verbose=False,
                  extra_cflags=["-O1", f"-march={BUILDS[name]}", "-fopenmp"], extra_ldflags=["-fopenmp"])
    assert module.simd() == name and not module.has_avx512() and not module.has_vnni()
    return module


@pytest.fixture(scope="module")
def scalar(tmp_path_factory):
    return build(tmp_path_factory, "scalar")


@pytest.fixture(scope="module")
def avx2(tmp_path_factory):
    own = qk.kernel_module()
    if own is not None and own.simd() == "avx2":
        return own  # this CPU's own build is the AVX2 one
    return build(tmp_path_factory, "avx2")


@pytest.fixture(params=list(BUILDS))
def built(request):
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_weight_only_matmul(built, kind):
    blocks, ref = file_blocks(kind, 33, 160, seed=3)
    x = torch.randn(9, 160, generator=torch.Generator().manual_seed(0))
    matmul = built.q4_1_matmul if kind == "Q4_1" else built.q8_0_matmul
    y = matmul(x, blocks)
    torch.testing.assert_close(y, x @ ref.t(), rtol=1e-5, atol=1e-4)
    assert all(torch.equal(matmul(x[:m].contiguous(), blocks), y[:m]) for m in range(1, 9))
    assert torch.equal(built.f32_matmul(torch.eye(160), ref.contiguous()), ref.t())
    # compact's bits are dense float32's: the same sums over the same (dequantized) weights
    assert torch.equal(built.f32_matmul(x, ref.contiguous()), y)


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("k", [96, 576])
def test_int8_activation_matmul(built, scalar, kind, k):
    code = {"Q4_1": 0, "Q8_0": 1}[kind]
    blocks, ref = file_blocks(kind, 37, k, seed=k)  # two full groups of 16 rows and a narrow one
    packed = built.q8_pack(blocks, code, k)
    assert torch.equal(built.q8_unpack(packed, code, k), ref)
    x = torch.randn(7, k, generator=torch.Generator().manual_seed(k)) * 2
    y = built.q8_matmul(x, packed, code)
    exact = rounded(x) @ ref.double().t()
    assert (y.double() - exact).abs().max() / exact.abs().max() < 2e-6
    assert all(torch.equal(built.q8_matmul(x[:m].contiguous(), packed, code), y[:m])
               for m in range(1, 7))
    assert torch.equal(y, scalar.q8_matmul(x, packed, code))
    fast = qk.kernel_module()
    if fast is not None and fast.has_vnni():  # one layout: the vector build reads the scalar one's
        torch.testing.assert_close(qk.q8_matmul(x, packed, kind), y, rtol=1e-5, atol=1e-5)


def test_attention_and_sign_matmul(built):
    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(6, 3, 32, generator=g), torch.randn(2, 40, 32, generator=g), \
        torch.randn(2, 40, 32, generator=g)
    slots = torch.randperm(40, generator=g)[:25].repeat(3, 1).contiguous()  # keys in any order
    counts = torch.tensor([25, 10, 1])
    out = built.logical_attention(q, k, v, slots, counts, 0.2, qk.NO_ROWS)
    for t, n in enumerate(counts.tolist()):
        keys = slots[t, :n]
        kk, vv = k[:, keys].repeat_interleave(3, 0), v[:, keys].repeat_interleave(3, 0)  # GQA
        want = torch.softmax(0.2 * torch.einsum("hd,hnd->hn", q[:, t], kk), -1)
        torch.testing.assert_close(out[:, t], torch.einsum("hn,hnd->hd", want, vv), rtol=1e-5, atol=1e-5)
    bits = torch.randint(0, 256, (17, 5), dtype=torch.uint8, generator=g)  # 37 inputs: a tail
    x = torch.randn(4, 37, generator=g)
    signs = ((bits[:, :, None] >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(17, -1)[:, :37]
    torch.testing.assert_close(built.sign_matmul(x, bits), x @ (2.0 * signs.float() - 1).t(),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_avx2_attention_over_split_keys_and_a_float16_cache(avx2, dtype):
    """The AVX2 attention past 512 keys (parts combined in order) and over a float16 cache:
    softmax attention to rounding, and each query's bits the same alone as among others."""
    g = torch.Generator().manual_seed(5)
    heads, kv, d, cap = 9, 3, 64, 1400
    k, v = (torch.randn(kv, cap, d, generator=g).to(dtype) for _ in range(2))
    q = torch.randn(heads, 3, d, generator=g)
    slots = torch.randperm(cap, generator=g)[:1300].repeat(3, 1).contiguous()
    counts = torch.tensor([1300, 513, 40])
    out = avx2.logical_attention(q, k, v, slots, counts, 0.125, qk.NO_ROWS)
    for t, n in enumerate(counts.tolist()):
        keys = slots[t, :n]
        kk, vv = (c[:, keys].double().repeat_interleave(3, 0) for c in (k, v))
        want = torch.softmax(0.125 * torch.einsum("hd,hnd->hn", q[:, t].double(), kk), -1)
        torch.testing.assert_close(out[:, t].double(), torch.einsum("hn,hnd->hd", want, vv),
                                   rtol=1e-5, atol=1e-5)
        alone = avx2.logical_attention(q[:, t:t + 1].contiguous(), k, v, slots[t:t + 1].contiguous(),
                                       counts[t:t + 1], 0.125, qk.NO_ROWS)
        assert torch.equal(alone[:, 0], out[:, t])
