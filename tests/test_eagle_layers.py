"""EAGLE heads over several target layers (EAGLE-3's input): the runtime taps the layers'
outputs without changing a bit of the step, the head reads them for committed positions,
and training, the server's batch and the exporters handle such heads."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

import hasten
from hasten.commands.train import parse_feature_layers
from hasten.decoding.batched import BatchedDecoder
from hasten.decoding.engine import generate_speculative
from hasten.decoding.generate import generate_plain
from hasten.eagle.data import build_features
from hasten.eagle.drafter import EagleDrafter
from hasten.eagle.export import eagle_layout
from hasten.eagle.head import EagleConfig, EagleHead, load_head, save_head
from hasten.eagle.train import EagleTrainConfig, run_eagle
from hasten.errors import HastenError
from hasten.medusa.heads import base_identity
from test_compact import cache, kernel, tiny_gguf  # noqa: F401 (fixtures)
from tiny import tiny_pair


def block_outputs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each block's output over a fresh cache, by forward hooks (the reference for taps)."""
    seen = []
    hooks = [b.register_forward_hook(lambda m, a, out: seen.append(out)) for b in model.blocks]
    try:
        model.reset(1, 64)
        model.forward(ids)
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_taps_are_the_blocks_outputs_and_change_nothing_else(dtype):
    ours, _ = tiny_pair(dtype=dtype, num_layers=3)
    ids = torch.tensor([[5, 9, 14, 3, 22, 7]])
    want = block_outputs(ours, ids)
    for taps in [(0, 2), (2, 1)]:
        ours.reset(1, 64)
        plain = ours.forward(ids)
        ours.reset(1, 64)
        out = ours.forward(ids, taps=taps)
        assert torch.equal(out.logits, plain.logits) and torch.equal(out.hidden, plain.hidden)
        assert torch.equal(out.taps, torch.cat([want[i] for i in taps], -1))  # in the order asked
        ours.commit()
        # A plain step (bfloat16: computed as two rows, `_padded_step`) taps its one row.
        step = ours.forward(torch.tensor([[11]]), taps=taps)
        assert step.taps.shape == (1, 1, len(taps) * ours.config.hidden_size)
    assert ours.forward(ids[:, :1]).taps is None
    with pytest.raises(ValueError, match="cannot tap layer"):
        ours.forward(ids[:, :1], taps=(3,))


def test_compiled_blocks_tap_in_stretches_with_the_bits_of_one_call(tmp_path, cache, kernel):
    cfg, path = tiny_gguf(tmp_path, head_dim=32, num_heads=4, num_kv_heads=2, num_layers=4)
    b = hasten.load(str(path), weights="compact-q8", progress=False).backbone
    assert b.run_blocks is not None
    prompt, ids = torch.tensor([[3, 8, 21, 5, 17]]), torch.tensor([[9, 4, 30]])

    def run(taps, compiled=True):
        keep, b.run_blocks = b.run_blocks, b.run_blocks if compiled else None
        try:
            b.reset(1, 64)
            b.forward(prompt, taps=taps)
            b.commit()
            return b.forward(ids, taps=taps)  # a decode-time step: the compiled blocks
        finally:
            b.run_blocks = keep

    whole, tapped, by_block = run(()), run((1, 3)), run((1, 3), compiled=False)
    assert torch.equal(tapped.logits, whole.logits)
    assert torch.equal(tapped.taps, by_block.taps)
    d = cfg.hidden_size
    assert torch.equal(b.norm(tapped.taps[..., d:]), tapped.hidden)  # the last layer, unnormed


def layers_head(cfg, layers, seed=0, dtype=torch.float32) -> EagleHead:
    torch.manual_seed(seed)
    head = EagleHead(EagleConfig.like(cfg, feature_layers=layers)).to(dtype)
    with torch.no_grad():  # far from the start, so every piece matters
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return head.eval()


def test_a_layers_head_starts_as_the_head_over_the_last_hidden_state():
    ours, _ = tiny_pair(dtype=torch.float32, num_layers=3)
    last = layers_head(ours.config, None)
    head = EagleHead(replace(last.config, feature_layers=[0, 2]))
    head.load_state_dict(last.state_dict(), strict=False)
    head.start_reduce_as_last(ours.norm.weight)
    ids = torch.tensor([[5, 9, 14, 3, 22, 7]])
    ours.reset(1, 64)
    out = ours.forward(ids, taps=(0, 2))
    embeds = ours.embed.weight[ids[0]]
    torch.testing.assert_close(head.fuse(embeds, out.taps[0]), last.fuse(embeds, out.hidden[0]),
                               rtol=1e-5, atol=1e-5)
    # Its own outputs (d wide) pass as they are: drafted pairs carry them.
    assert torch.equal(head.fuse(embeds, out.hidden[0]), last.fuse(embeds, out.hidden[0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_with_a_layers_head_is_plain_and_it_reads_the_layers(dtype):
    ours, _ = tiny_pair(dtype=dtype, num_layers=3)
    head = layers_head(ours.config, [0, 1, 2], dtype=dtype)
    drafter = EagleDrafter(head, ours.embed.weight, ours.lm_head.weight, depth=4, topk=3)
    assert drafter.feature_layers == (0, 1, 2)
    widths = []
    observe = drafter.observe
    drafter.observe = lambda tokens, feats=None: (widths.append(feats.shape[-1]), observe(tokens, feats))
    prompt = [5, 9, 14, 3, 22, 7, 9, 14]
    plain = list(generate_plain(ours, prompt, 40))
    assert list(generate_speculative(ours, drafter, prompt, 40, tree_size=12)) == plain
    assert set(widths) == {3 * ours.config.hidden_size}
    # Each pair the head was fed is (the layers' outputs at q, token q + 1): rerun and compare.
    context = drafter.context
    ours.reset(1, 256)
    assert drafter.fed == len(context) - 1 or drafter.pending


def test_batched_rows_keep_their_layers_as_the_solo_forward():
    ours, _ = tiny_pair(dtype=torch.bfloat16, num_layers=3)  # exact: rows as if alone
    decoder = BatchedDecoder(ours, rows=2, capacity=64)
    decoder.taps = (0, 2)
    prompts = [[5, 9, 14, 3], [7, 7, 2, 30, 11, 4]]
    seqs = [decoder.add(p) for p in prompts]
    decoder.step()
    for seq, prompt in zip(seqs, prompts):
        ours.reset(1, 64)
        ours.forward(torch.tensor([prompt]))
        ours.commit()
        solo = ours.forward(torch.tensor([[seq.tokens[0]]]), taps=(0, 2))
        assert torch.equal(seq.taps, solo.taps[0])
        assert torch.equal(seq.hidden, solo.hidden[0])


def test_layers_head_files_round_trip_refuse_a_shallower_model_and_do_not_export(tmp_path):
    ours, _ = tiny_pair(dtype=torch.float32, num_layers=3)
    head = layers_head(ours.config, [0, 2])
    save_head(head, tmp_path / "h", base_identity(ours, "tiny"))
    loaded = load_head(tmp_path / "h", ours, "tiny")
    assert loaded.head.config.feature_layers == [0, 2]
    assert torch.equal(loaded.head.reduce.weight, head.reduce.weight)
    shallow = copy.deepcopy(ours)  # the same LM head, one layer fewer
    shallow.blocks = shallow.blocks[:2]
    shallow.config = replace(ours.config, num_layers=2)
    with pytest.raises(HastenError, match="reads layer 2, but this model has 2 layers"):
        load_head(tmp_path / "h", shallow)
    with pytest.raises(HastenError, match="trained without --feature-layers"):
        eagle_layout(loaded, "vllm")


def test_training_a_layers_head_from_a_last_state_head(tmp_path):
    ours, _ = tiny_pair(dtype=torch.float32, num_layers=3)
    gen = torch.Generator().manual_seed(0)
    records = [{"key": str(i), "prompt_ids": torch.randint(3, 90, (6,), generator=gen).tolist(),
                "answer_ids": torch.randint(3, 90, (20,), generator=gen).tolist()} for i in range(12)]
    feats = build_features(ours, records[:3], tmp_path / "c", "tiny", progress=False,
                           feature_layers=(0, 2))
    tokens, _, _ = feats.sequence(1)
    ours.reset(1, 64)
    want = ours.forward(torch.tensor([tokens.tolist()]), taps=(0, 2)).taps[0]
    start, length, _ = feats.index[1]
    torch.testing.assert_close(torch.from_numpy(feats.inputs[start:start + length].astype("float32")),
                               want, atol=2e-2, rtol=2e-3)  # stored as float16
    init = layers_head(ours.config, None)
    cfg = EagleTrainConfig(epochs=2, batch_tokens=512, lr=1e-3, unroll=1)
    record = run_eagle(ours, records, tmp_path / "h", name="tiny", model_key="tiny", cfg=cfg,
                       holdout=3, progress=False, init=init, feature_layers=[0, 2],
                       calibration_prompts=2)
    assert record["steps"] >= 2 and "acc1" in record["heldout"]
    head = load_head(tmp_path / "h", ours, "tiny").head
    assert head.config.feature_layers == [0, 2]
    with pytest.raises(HastenError, match="reads layers"):
        run_eagle(ours, records, tmp_path / "h2", name="tiny", model_key="tiny", cfg=cfg,
                  holdout=3, progress=False, init=head, feature_layers=[1, 2])


def test_feature_layers_option():
    with pytest.raises(ValueError, match="two or more"):
        EagleHead(EagleConfig.like(tiny_pair(num_layers=3)[0].config, feature_layers=[1]))
    assert parse_feature_layers("auto", 30) == [2, 15, 29]
    assert parse_feature_layers("3,1", 30) == [3, 1]
    for bad in ("x", "30", "1,1", "", "5"):
        with pytest.raises(HastenError, match="--feature-layers"):
            parse_feature_layers(bad, 30)


def test_the_transformers_adapter_taps_all_but_the_last_layer():
    from hasten.models.hf_adapter import HFBackbone
    ours, ref = tiny_pair(dtype=torch.float64, num_layers=3)
    hf = HFBackbone(ref)
    ids = torch.tensor([[5, 9, 14, 3, 22, 7]])
    hf.reset(1, 64)
    got = hf.forward(ids, taps=(1, 0)).taps
    want = block_outputs(ours, ids)
    torch.testing.assert_close(got, torch.cat([want[1], want[0]], -1))
    with pytest.raises(HastenError, match="cannot tap the last layer"):
        hf.forward(ids[:, :1], taps=(2,))
