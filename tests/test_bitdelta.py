"""BitDelta on tiny random Llama models: packing, compression, delta-aware layers, checks,
distillation, resume, and the commands end to end on tiny Hugging Face folders."""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import pytest
import torch
import transformers

from hasten.bitdelta import delta as bd
from hasten.bitdelta import distill as distill_mod
from hasten.bitdelta.pack import pack_signs, sign_matmul, unpack_signs
from hasten.bitdelta.runtime import block_linear_names, hf_state_dict, set_route
from hasten.errors import HastenError
from hasten.models import quant_kernels as qk
from hasten.models.llama import build_llama

from tiny import hf_reference, tiny_config

VOCAB = 259  # 256 byte symbols + 3 special tokens (see tiny_tokenizer)


def tiny_tokenizer(extra: tuple[str, ...] = ()):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values()) + ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    symbols += list(extra)
    tok = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(symbols)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def base_weights(seed: int = 0, **overrides) -> tuple[dict, dict]:
    cfg = tiny_config(vocab_size=VOCAB, **overrides)
    ref = hf_reference(cfg, seed=seed, dtype=torch.float32)
    return {k: v.detach().clone() for k, v in ref.state_dict().items()}, cfg.to_hf_dict()


def finetuned(base_sd: dict, seed: int = 1, scale: float = 0.02, others: bool = False) -> dict:
    """The base plus a random delta on every block linear weight whose magnitude varies a lot
    between matrices and rows (so mean |delta| is a poor scale and distillation has work)."""
    g = torch.Generator().manual_seed(seed)
    ft = {k: v.clone() for k, v in base_sd.items()}
    for i, name in enumerate(n for n in ft if n.endswith("_proj.weight")):
        w = ft[name]
        rows = torch.rand(w.shape[0], 1, generator=g) ** 3
        ft[name] = w + scale * (1 + i % 3) * rows * torch.randn(w.shape, generator=g)
    if others:
        ft["model.norm.weight"] = ft["model.norm.weight"] + 0.1
        ft["model.embed_tokens.weight"][[3, 7]] += 0.5  # two rows of the embedding
    return ft


def save_folder(path, sd: dict, config: dict, tokenizer=None):
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in sd.items()}, path / "model.safetensors")
    (tokenizer or tiny_tokenizer()).save_pretrained(path)
    return path


@pytest.fixture
def pair(tmp_path):
    """Folders of a tiny base and a fine-tune of it, with their weights and config."""
    base_sd, config = base_weights()
    ft_sd = finetuned(base_sd)
    return (save_folder(tmp_path / "base", base_sd, config),
            save_folder(tmp_path / "ft", ft_sd, config), base_sd, ft_sd, config)


def double(sd: dict) -> dict:
    return {k: v.double() for k, v in sd.items()}


def model_of(sd: dict, config: dict, dtype=torch.float64):
    from hasten.models.config import LlamaConfig

    return build_llama(LlamaConfig.from_hf_dict(config), sd, dtype)


def ids(n: int = 2, t: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


# ---- packing --------------------------------------------------------------------------------

def test_pack_layout_is_little_endian_along_the_input_dimension():
    row = torch.tensor([[1.0, -1, -1, 2, 0, -3, -1, -1, 5, -1]])  # 10 inputs -> 2 bytes
    packed = pack_signs(row)
    assert packed.dtype == torch.uint8 and packed.shape == (1, 2)
    assert packed.tolist() == [[0b00001001, 0b00000001]]  # bits 0 and 3; then bit 0; padding 0


@pytest.mark.parametrize("shape", [(5, 13), (16, 64), (1, 1)])
def test_unpack_inverts_pack(shape):
    delta = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    signs = unpack_signs(pack_signs(delta), shape[1])
    assert torch.equal(signs, torch.where(delta > 0, 1.0, -1.0))


@pytest.mark.parametrize("rows", [1, 3, 9, 20])  # both the gather and the unpack path
def test_sign_matmul_equals_dense_product(rows):
    g = torch.Generator().manual_seed(1)
    delta, x = torch.randn(37, 29, generator=g), torch.randn(2, rows, 29, generator=g, dtype=torch.float64)
    packed = pack_signs(delta)
    want = x @ unpack_signs(packed, 29, torch.float64).t()
    got = sign_matmul(x, packed, 29, block=16)
    assert got.shape == (2, rows, 37)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sign_matmul_kernel_rows_do_not_depend_on_the_row_count(dtype):
    """The compiled kernel (where it builds): close to the float64 product, and row r's bits
    the same alone, among 9 rows or 100 (a verify tree, a batch): what keeps tenants exact."""
    from hasten.models.quant_kernels import kernel_module
    if kernel_module() is None:
        pytest.skip("the compiled kernel cannot be built here")
    g = torch.Generator().manual_seed(2)
    for n_in in (576, 29, 40):  # whole 16-lane groups, a tail under 8, a tail over 8
        delta, x = torch.randn(70, n_in, generator=g), torch.randn(100, n_in, generator=g).to(dtype)
        packed = pack_signs(delta)
        want = x.double() @ unpack_signs(packed, n_in, torch.float64).t()
        got = sign_matmul(x, packed, n_in)
        assert got.dtype == dtype
        assert torch.allclose(got.double(), want, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                              atol=0.05 if dtype == torch.bfloat16 else 1e-4)
        for rows in (1, 2, 9):
            assert torch.equal(sign_matmul(x[:rows], packed, n_in), got[:rows])


# ---- compression ----------------------------------------------------------------------------

def test_signs_and_scales_are_exact(pair):
    *_, base_sd, ft_sd, config = pair
    d = bd.compress(base_sd, config, ft_sd, config)
    linear = block_linear_names(config["num_hidden_layers"])
    assert d.meta["linear"] == linear and len(linear) == 2 * 7
    for name in linear:
        delta = ft_sd[name] - base_sd[name]
        assert torch.equal(unpack_signs(d.signs[name], delta.shape[1]), torch.where(delta > 0, 1.0, -1.0))
        assert d.scales[name] == pytest.approx(delta.abs().mean().item(), rel=1e-6)
    assert d.tensors == {} and d.rows == {}  # embeddings, norms, head unchanged: not stored


def test_other_tensors_stored_only_where_they_differ():
    base_sd, config = base_weights()
    ft_sd = finetuned(base_sd, others=True)
    d = bd.compress(base_sd, config, ft_sd, config)
    assert set(d.tensors) == {"model.norm.weight", "model.embed_tokens.weight"}
    assert d.rows["model.embed_tokens.weight"].tolist() == [3, 7]
    assert d.tensors["model.embed_tokens.weight"].shape == (2, 32)
    merged = bd.merged_state_dict(base_sd, d)
    for name in d.tensors:
        assert torch.equal(merged[name], ft_sd[name])


def test_delta_is_over_ten_times_smaller_than_a_full_copy(pair, tmp_path):
    *_, base_sd, ft_sd, config = pair
    path = bd.save(bd.compress(base_sd, config, ft_sd, config), tmp_path / "d")
    linear = block_linear_names(2)
    sign_bytes = sum(ft_sd[n].shape[0] * ((ft_sd[n].shape[1] + 7) // 8) for n in linear)
    full = sum(t.numel() * 4 for t in ft_sd.values())
    on_disk = (path / bd.WEIGHTS_FILE).stat().st_size
    assert sign_bytes <= on_disk < sign_bytes + 8 * len(linear) + 6000  # + header
    assert full / on_disk > 10
    assert json.loads((path / bd.META_FILE).read_text())["full_copy_bytes"] == full


def test_save_load_round_trip(tmp_path):
    base_sd, config = base_weights()
    d = bd.compress(base_sd, config, finetuned(base_sd, others=True), config)
    d.scales = {n: s * 1.5 for n, s in d.scales.items()}
    back = bd.load(bd.save(d, tmp_path / "d"))
    assert back.meta == d.meta
    assert back.signs.keys() == d.signs.keys()
    assert all(torch.equal(back.signs[n], d.signs[n]) for n in d.signs)
    assert back.scales == pytest.approx(d.scales) and back.initial_scales == pytest.approx(d.initial_scales)
    assert back.scales != back.initial_scales
    assert all(torch.equal(back.tensors[n], d.tensors[n]) for n in d.tensors)
    assert all(torch.equal(back.rows[n], d.rows[n]) for n in d.rows)


def test_merged_weights_are_base_plus_scale_times_sign(pair):
    *_, base_sd, ft_sd, config = pair
    d = bd.compress(base_sd, config, ft_sd, config)
    merged = bd.merged_state_dict(base_sd, d)
    name = "model.layers.1.mlp.up_proj.weight"
    delta = ft_sd[name] - base_sd[name]
    want = base_sd[name] + delta.abs().mean() * torch.where(delta > 0, 1.0, -1.0)
    assert torch.allclose(merged[name], want, atol=1e-6)
    # the 1-bit approximation is closer to the fine-tune than the base is
    assert (merged[name] - ft_sd[name]).norm() < (base_sd[name] - ft_sd[name]).norm()


def test_hf_state_dict_inverts_loading():
    base_sd, config = base_weights()
    back = hf_state_dict(model_of(base_sd, config, torch.float32))
    assert back.keys() == base_sd.keys()
    assert all(torch.equal(back[n], base_sd[n]) for n in base_sd)


# ---- delta-aware layers vs merged weights ---------------------------------------------------

def test_delta_aware_model_matches_merged_weights(pair):
    *_, base_sd, ft_sd, config = pair
    d = bd.compress(base_sd, config, ft_sd, config)
    base_sd = double(base_sd)
    base = model_of(base_sd, config)
    aware = bd.delta_backbone(base, [d])
    merged = model_of(bd.merged_state_dict(base_sd, d), config)
    x = ids()
    want = merged(x).logits
    assert torch.allclose(aware(x).logits, want, rtol=0, atol=1e-10)
    # the base is shared, not copied, and still computes the base model
    assert aware.blocks[0].wqkv.base.weight_t.data_ptr() == base.blocks[0].wqkv.weight_t.data_ptr()
    assert aware.embed.weight.data_ptr() == base.embed.weight.data_ptr()
    assert not torch.allclose(base(x).logits, want, atol=1e-3)
    # incremental decoding through the KV cache (one-row steps: the gather kernel)
    aware.reset(batch_size=2, capacity=32)
    aware(x[:, :8]); aware.commit()
    steps = []
    for t in range(8, 12):
        steps.append(aware(x[:, t:t + 1]).logits); aware.commit()
    assert torch.allclose(torch.cat(steps, 1), want[:, 8:], atol=1e-10)


def test_delta_aware_model_with_own_norms_and_embedding_rows():
    base_sd, config = base_weights(tie_word_embeddings=True)
    base_sd.pop("lm_head.weight", None)
    ft_sd = finetuned(base_sd, others=True)
    d = bd.compress(base_sd, config, ft_sd, config)
    base_sd = double(base_sd)
    base = model_of(base_sd, config)
    aware = bd.delta_backbone(base, [d])
    merged = model_of(bd.merged_state_dict(base_sd, d), config)
    x = ids()
    assert torch.allclose(aware(x).logits, merged(x).logits, atol=1e-10)
    assert torch.equal(base.norm.weight, base_sd["model.norm.weight"].double())  # base untouched


def test_tenants_batched_in_one_forward_match_their_own_models(pair):
    *_, base_sd, ft_sd, config = pair
    d1 = bd.compress(base_sd, config, ft_sd, config)
    d2 = bd.compress(base_sd, config, finetuned(base_sd, seed=5), config)
    base_sd = double(base_sd)
    base = model_of(base_sd, config)
    multi = bd.delta_backbone(base, [d1, d2])
    x = ids(3)
    set_route(multi, [1, -1, 0])
    got = multi(x).logits
    for row, want_model in ((0, model_of(bd.merged_state_dict(base_sd, d2), config)), (1, base),
                            (2, model_of(bd.merged_state_dict(base_sd, d1), config))):
        assert torch.allclose(got[row], want_model(x[row:row + 1]).logits[0], atol=1e-10)


def test_tenants_that_change_norms_cannot_share_a_batch():
    base_sd, config = base_weights()
    d = bd.compress(base_sd, config, finetuned(base_sd, others=True), config)
    with pytest.raises(bd.DeltaError, match="merged"):
        bd.delta_backbone(model_of(base_sd, config), [d, d])


# ---- checks ---------------------------------------------------------------------------------

def test_delta_on_another_base_is_refused(pair):
    *_, base_sd, ft_sd, config = pair
    d = bd.compress(base_sd, config, ft_sd, config)
    bd.check_base(d, base_sd)  # the right base passes
    other, _ = base_weights(seed=7)
    with pytest.raises(bd.DeltaError, match="another base"):
        bd.check_base(d, other)


def test_fine_tune_of_another_architecture_is_refused():
    base_sd, config = base_weights()
    other_sd, other_config = base_weights(num_layers=3)
    with pytest.raises(bd.DeltaError, match="num_layers"):
        bd.compress(base_sd, config, other_sd, other_config)
    gpt2 = {"model_type": "gpt2", "n_layer": 2}
    with pytest.raises(bd.DeltaError, match="Llama-family"):
        bd.compress(base_sd, config, base_sd, gpt2)


def test_fine_tune_with_other_shapes_or_tensors_is_refused():
    base_sd, config = base_weights()
    ft = dict(base_sd)
    ft["model.layers.0.mlp.up_proj.weight"] = torch.zeros(57, 32)
    with pytest.raises(bd.DeltaError, match="shapes"):
        bd.compress(base_sd, config, ft, config)
    ft = dict(base_sd)
    ft.pop("model.norm.weight")
    with pytest.raises(bd.DeltaError, match="missing"):
        bd.compress(base_sd, config, ft, config)


def test_fine_tune_with_another_tokenizer_is_refused():
    base_sd, config = base_weights()
    with pytest.raises(bd.DeltaError, match="tokenizer"):
        bd.compress(base_sd, config, finetuned(base_sd), config, tiny_tokenizer(),
                    tiny_tokenizer(extra=("<|tool|>",)))
    bd.compress(base_sd, config, finetuned(base_sd), config, tiny_tokenizer(), tiny_tokenizer())


# ---- distillation ---------------------------------------------------------------------------

def compressed(pair, tmp_path):
    base, ft, *_ = pair
    return bd.save(bd.compress_folders(base, ft), tmp_path / "delta")


def test_distillation_lowers_the_logit_error(tmp_path):
    """A fine-tune that is exactly base + a_k * sign_k per matrix, compressed with every scale
    halved: distillation must find its way back towards a_k."""
    base_sd, config = base_weights()
    g = torch.Generator().manual_seed(3)
    ft_sd = dict(base_sd)
    for k, name in enumerate(block_linear_names(2)):
        signs = torch.where(torch.randn(base_sd[name].shape, generator=g) > 0, 1.0, -1.0)
        ft_sd[name] = base_sd[name] + 0.01 * (1 + k % 4) * signs
    base = save_folder(tmp_path / "base", base_sd, config)
    ft = save_folder(tmp_path / "ft", ft_sd, config)
    d = bd.compress_folders(base, ft)
    d.initial_scales = d.scales = {n: s / 2 for n, s in d.scales.items()}
    path = bd.save(d, tmp_path / "delta")
    report = distill_mod.distill(base, ft, path, steps=30, batch=4, lr=0.1, progress=False,
                                 texts=ids(16, 24, seed=1), held_out=ids(4, 24, seed=2))
    assert report["mse_after"] < 0.3 * report["mse_before"]
    assert report["kl_after"] < 0.3 * report["kl_before"]
    d = bd.load(path)
    assert d.meta["distill"] == report and d.scales != d.initial_scales
    assert not (path / distill_mod.STATE_FILE).exists()  # finished: no state left behind
    # the stored scales are what gives the reported error
    from hasten.bitdelta.evaluate import logit_distance
    merged = model_of(bd.merged_state_dict(bd.load_weights(base), d), json.loads((ft / "config.json").read_text()), torch.float32)
    teacher = model_of(bd.load_weights(ft), json.loads((ft / "config.json").read_text()), torch.float32)
    assert logit_distance(merged, teacher, ids(4, 24, seed=2))[0] == pytest.approx(report["mse_after"], rel=1e-3)


@contextlib.contextmanager
def crash_at_step(n: int):
    """Distillation's n-th training step raises KeyboardInterrupt, as a crash mid-run would."""
    real, calls = distill_mod.logit_terms, []

    def crashing(*args):
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == n:
                raise KeyboardInterrupt
        return real(*args)
    distill_mod.logit_terms = crashing
    try:
        yield
    finally:
        distill_mod.logit_terms = real


def test_distillation_resumes_where_it_stopped(pair, tmp_path):
    base, ft, *_ = pair
    options = dict(steps=6, batch=2, lr=0.05, checkpoint_every=2, progress=False,
                   texts=ids(8, 16, seed=1), held_out=ids(2, 16, seed=2))
    straight = tmp_path / "straight"
    straight.mkdir()
    path = compressed(pair, straight)
    distill_mod.distill(base, ft, path, **options)
    want = bd.load(path).scales

    path = compressed(pair, tmp_path)
    with crash_at_step(5), pytest.raises(KeyboardInterrupt):
        distill_mod.distill(base, ft, path, **options)
    assert torch.load(path / distill_mod.STATE_FILE, weights_only=False)["step"] == 4
    with pytest.raises(HastenError, match="other settings"):
        distill_mod.distill(base, ft, path, **{**options, "lr": 0.01})
    report = distill_mod.distill(base, ft, path, **options)
    assert bd.load(path).scales == pytest.approx(want, rel=1e-6)
    assert len(report["last_losses"]) == 5


def test_distillation_can_be_stopped_early_and_resumed_with_fewer_steps(pair, tmp_path):
    base, ft, *_ = pair
    options = dict(batch=2, lr=0.05, checkpoint_every=2, progress=False,
                   texts=ids(8, 16, seed=1), held_out=ids(2, 16, seed=2))
    straight = tmp_path / "straight"
    straight.mkdir()
    path = compressed(pair, straight)
    distill_mod.distill(base, ft, path, steps=4, **options)
    path2 = compressed(pair, tmp_path)
    with crash_at_step(7), pytest.raises(KeyboardInterrupt):
        distill_mod.distill(base, ft, path2, steps=10, **options)
    report = distill_mod.distill(base, ft, path2, steps=4, **options)  # checkpoint at 6 > 4
    assert report["steps"] == 6  # the steps actually made
    assert bd.load(path2).scales != bd.load(path).scales


def test_distillation_checks_the_fine_tune(pair, tmp_path):
    base, ft, base_sd, _, config = pair
    path = compressed(pair, tmp_path)
    other = save_folder(tmp_path / "other", finetuned(base_sd, seed=9), config)
    with pytest.raises(HastenError, match="not the fine-tune"):
        distill_mod.distill(base, other, path, steps=1, progress=False,
                            texts=ids(2, 8), held_out=ids(2, 8))


# ---- commands end to end --------------------------------------------------------------------

def run_cli(argv: list[str]) -> None:
    from hasten.commands import build_parser

    args = build_parser().parse_args(argv)
    args.run(args)


def test_commands_end_to_end(pair, tmp_path, capsys):
    base, *_ = pair
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"def f{i}(x):\n    return x * {i} + {i % 7}" for i in range(200)))
    ft = tmp_path / "tuned"
    run_cli(["finetune", "--base", str(base), "--domain", str(text), "--output", str(ft),
             "--steps", "3", "--batch", "2", "--window", "16", "--lr", "1e-2",
             "--eval-windows", "2", "--eval-prompts", "3", "--eval-tokens", "4"])
    report = json.loads((ft / "finetune.json").read_text())
    assert report["eval"]["ppl_finetune"] < report["eval"]["ppl_base"]
    assert 0 <= report["eval"]["base_agreement_with_finetune"] <= 1
    tuned = bd.load_weights(ft)
    assert torch.equal(tuned["model.norm.weight"], bd.load_weights(base)["model.norm.weight"])
    out = tmp_path / "delta"
    run_cli(["bitdelta", "compress", "--base", str(base), "--finetune", str(ft), "--output",
             str(out), "--distill-steps", "2", "--distill-batch", "2", "--distill-windows", "4",
             "--distill-window", "16", "--distill-text", str(text)])
    printed = capsys.readouterr().out
    assert "logit MSE" in printed and "smaller" in printed
    run_cli(["bitdelta", "info", str(out)])
    assert "other tensors stored: none" in capsys.readouterr().out
    run_cli(["bitdelta", "info", str(out), "--json"])
    assert json.loads(capsys.readouterr().out)["distill"]["steps"] == 2
    # hasten generate --delta: the fine-tune's text, from the base plus the delta
    from hasten.api import load
    from hasten.bitdelta.model import with_delta
    prompt = "def f3(x):"
    want = with_delta(load(str(base), progress=False), out).generate(prompt, 6, chat=False)
    run_cli(["generate", "--model", str(base), "--delta", str(out), "--raw", "-n", "6", prompt])
    assert capsys.readouterr().out == want + "\n"
    with pytest.raises(bd.DeltaError, match="another architecture"):
        small_sd, small_config = base_weights(num_layers=1)
        small = save_folder(tmp_path / "small", small_sd, small_config)
        run_cli(["bitdelta", "compress", "--base", str(base), "--finetune", str(small),
                 "--output", str(tmp_path / "bad"), "--distill-steps", "0"])


def test_with_delta_gives_a_model_of_base_plus_delta(pair, tmp_path):
    from hasten.api import load
    from hasten.bitdelta.model import with_delta

    base, ft, base_sd, ft_sd, config = pair
    path = compressed(pair, tmp_path)
    model = load(str(base), dtype="float64")
    x = ids(1)
    aware, merged = with_delta(model, path), with_delta(model, path, merged=True)
    assert torch.allclose(aware.backbone(x).logits, merged.backbone(x).logits, atol=1e-10)
    assert aware.generate_ids(x[0].tolist(), 5, ignore_eos=True) is not None
    assert list(aware.generate_ids(x[0].tolist(), 6, ignore_eos=True)) == \
        list(merged.generate_ids(x[0].tolist(), 6, ignore_eos=True))
    from hasten.commands.bitdelta import apply_delta
    assert apply_delta(model, argparse.Namespace(delta=None)) is model
    via_args = apply_delta(model, argparse.Namespace(delta=str(path), delta_merged=False))
    via_args.backbone.reset(1, 32)
    aware.backbone.reset(1, 32)
    assert torch.equal(via_args.backbone(x).logits, aware.backbone(x).logits)
    other = save_folder(tmp_path / "other", base_weights(seed=3)[0], config)
    with pytest.raises(bd.DeltaError, match="another base"):
        with_delta(load(str(other)), path)


@pytest.mark.parametrize("tied", [False, True])
def test_a_delta_applies_to_the_float32_model_load_builds(tmp_path, tied):
    """`load(dtype="float32")` runs the compiled-kernel layers (`KernelDense`) where they build:
    the delta-aware model must wrap those, share their weights, and compute the merged model
    (tied: the delta's own embedding and norm too, the LM head as KernelDense stores it)."""
    from hasten.api import load
    from hasten.bitdelta.model import with_delta
    from hasten.models.compact import KernelDense

    base_sd, config = base_weights(tie_word_embeddings=tied, intermediate_size=64)  # kernel shapes
    if tied:
        base_sd.pop("lm_head.weight", None)
    ft_sd = finetuned(base_sd, others=tied)
    base = save_folder(tmp_path / "base", base_sd, config)
    path = tmp_path / "delta"
    bd.save(bd.compress(base_sd, config, ft_sd, config), path)
    model = load(str(base))
    aware, merged = with_delta(model, path), with_delta(model, path, merged=True)
    x = ids(1)
    for m in (aware, merged):
        m.backbone.reset(1, 32)
    assert torch.allclose(aware.backbone(x).logits, merged.backbone(x).logits, atol=1e-4)
    layer = model.backbone.blocks[0].wqkv
    if qk.vector_kernels():
        assert isinstance(layer, KernelDense)
        assert aware.backbone.blocks[0].wqkv.base is not layer  # a new module ...
        assert aware.backbone.blocks[0].wqkv.base.w is layer.w  # ... over the same weights
    assert model.backbone.blocks[0].wqkv is layer  # the base model untouched
    assert list(aware.generate_ids(x[0].tolist(), 6, ignore_eos=True)) == \
        list(merged.generate_ids(x[0].tolist(), 6, ignore_eos=True))


def test_a_delta_on_compact_q8_with_its_float16_cache_batches_as_it_decodes_alone(tmp_path, monkeypatch):
    """The default plan on a GGUF (compact-q8 here) keeps a float16 KV cache; a delta-aware
    model runs its blocks through the Python path (DeltaDense cannot join the compiled call),
    which writes that cache too: speculative, batched and tenant-routed decoding all give the
    solo greedy tokens."""
    import json

    from hasten.api import load
    from hasten.bitdelta.model import with_delta
    from hasten.bitdelta.serving import tenant_backbone
    from hasten.decoding.batched import BatchedDecoder
    from hasten.models.sources import load_weights
    from test_compact import tiny_gguf

    if not qk.fast_int8():
        pytest.skip("compact-q8 needs the vector int8 kernel (AVX-512 VNNI or AVX2)")
    monkeypatch.setenv("HASTEN_CACHE", str(tmp_path / "cache"))
    _, path = tiny_gguf(tmp_path, head_dim=32, num_heads=4, num_kv_heads=2)
    model = load(str(path), weights="compact-q8", progress=False)
    assert model.backbone.kv_dtype == torch.float16
    base_sd = load_weights(model.folder)
    config = json.loads((model.folder / "config.json").read_text())
    bd.save(bd.compress(base_sd, config, finetuned(base_sd), config), tmp_path / "delta")
    aware = with_delta(model, tmp_path / "delta")
    prompt = model.encode("hello hello hello", chat=False)
    want = list(aware.generate_ids(prompt, 12, ignore_eos=True))
    assert list(aware.generate_ids(prompt, 12, ignore_eos=True, draft="lookup", tree_size=4)) == want
    for backbone, tenant in ((aware.backbone, -1), (tenant_backbone(model, {"t": tmp_path / "delta"}), 0)):
        decoder = BatchedDecoder(backbone, 2, 128)
        decoder.route_tenants = tenant >= 0
        seq = decoder.add(prompt, tenant=tenant)
        assert [seq.root] + [decoder.step()[0][1] for _ in range(11)] == want


def test_delta_arguments_for_generate_and_serve():
    from hasten.commands.bitdelta import add_delta_args, parse_tenants

    p = argparse.ArgumentParser()
    add_delta_args(p, serve=True)
    args = p.parse_args(["--delta", "code=/d/code", "--delta", "math=/d/math"])
    assert parse_tenants(args.delta) == {"code": Path("/d/code"), "math": Path("/d/math")}
    with pytest.raises(HastenError, match="NAME=PATH"):
        parse_tenants(["/d/code"])
    with pytest.raises(HastenError, match="twice"):
        parse_tenants(["a=/x", "a=/y"])
