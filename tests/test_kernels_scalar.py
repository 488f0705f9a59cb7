"""The kernels' scalar branches, which a CPU without AVX-512 (or without VNNI) builds and this
one normally never compiles: built here with -march=x86-64-v3 and run. They must compute the
same products as the vector code (other bits are allowed: their own sums in order) with rows
independent of the row count. A redeclaration in a scalar branch once went unnoticed, and such
a machine would have fallen back to the slow pure-torch path (~1 min: a build)."""

import shutil

import pytest
import torch

from hasten.models import quant_kernels as qk
from test_compact import file_blocks
from test_q8_activations import rounded


@pytest.fixture(scope="module")
def scalar(tmp_path_factory):
    if shutil.which("g++") is None or shutil.which("ninja") is None:
        pytest.skip("no g++ / ninja here")
    from torch.utils.cpp_extension import load
    folder = tmp_path_factory.mktemp("scalar-kernels")
    module = load(name="quant_matmul_scalar", sources=[str(s) for s in qk.SOURCES],
                  build_directory=str(folder), verbose=False,
                  extra_cflags=["-O1", "-march=x86-64-v3", "-fopenmp"], extra_ldflags=["-fopenmp"])
    assert not module.has_avx512() and not module.has_vnni()
    return module


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_scalar_weight_only_matmul(scalar, kind):
    blocks, ref = file_blocks(kind, 33, 160, seed=3)
    x = torch.randn(9, 160, generator=torch.Generator().manual_seed(0))
    matmul = scalar.q4_1_matmul if kind == "Q4_1" else scalar.q8_0_matmul
    y = matmul(x, blocks)
    torch.testing.assert_close(y, x @ ref.t(), rtol=1e-5, atol=1e-4)
    assert all(torch.equal(matmul(x[:m].contiguous(), blocks), y[:m]) for m in range(1, 9))
    assert torch.equal(scalar.f32_matmul(torch.eye(160), ref.contiguous()), ref.t())


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("k", [96, 576])
def test_scalar_int8_activation_matmul(scalar, kind, k):
    code = {"Q4_1": 0, "Q8_0": 1}[kind]
    blocks, ref = file_blocks(kind, 21, k, seed=k)
    packed = scalar.q8_pack(blocks, code, k)
    assert torch.equal(scalar.q8_unpack(packed, code, k), ref)
    x = torch.randn(7, k, generator=torch.Generator().manual_seed(k)) * 2
    y = scalar.q8_matmul(x, packed, code)
    exact = rounded(x) @ ref.double().t()
    assert (y.double() - exact).abs().max() / exact.abs().max() < 2e-6
    assert all(torch.equal(scalar.q8_matmul(x[:m].contiguous(), packed, code), y[:m])
               for m in range(1, 7))
    fast = qk.kernel_module()
    if fast is not None and fast.has_vnni():  # one layout: the vector build reads the scalar one's
        torch.testing.assert_close(qk.q8_matmul(x, packed, kind), y, rtol=1e-5, atol=1e-5)


def test_scalar_attention_and_sign_matmul(scalar):
    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(6, 3, 32, generator=g), torch.randn(2, 40, 32, generator=g), \
        torch.randn(2, 40, 32, generator=g)
    slots = torch.randperm(40, generator=g)[:25].repeat(3, 1).contiguous()  # keys in any order
    counts = torch.tensor([25, 10, 1])
    out = scalar.logical_attention(q, k, v, slots, counts, 0.2, qk.NO_ROWS)
    for t, n in enumerate(counts.tolist()):
        keys = slots[t, :n]
        kk, vv = k[:, keys].repeat_interleave(3, 0), v[:, keys].repeat_interleave(3, 0)  # GQA
        want = torch.softmax(0.2 * torch.einsum("hd,hnd->hn", q[:, t], kk), -1)
        torch.testing.assert_close(out[:, t], torch.einsum("hn,hnd->hd", want, vv), rtol=1e-5, atol=1e-5)
    bits = torch.randint(0, 256, (17, 5), dtype=torch.uint8, generator=g)  # 37 inputs: a tail
    x = torch.randn(4, 37, generator=g)
    signs = ((bits[:, :, None] >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(17, -1)[:, :37]
    torch.testing.assert_close(scalar.sign_matmul(x, bits), x @ (2.0 * signs.float() - 1).t(),
                               rtol=1e-5, atol=1e-5)
