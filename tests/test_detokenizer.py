"""Streaming text: pieces that join to the full decode, no empty pieces, linear cost."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from hasten.api import Detokenizer

TEXTS = ["Hello wörld! 你好，世界。 Emoji: 🤖🎨👩‍💻 done.", "naïve café — ßtraße 日本語テキスト 🚀🚀",
         "plain ascii words only here", "  leading spaces and\nnew lines\n\n 🙂"]


def byte_level() -> PreTrainedTokenizerFast:
    """GPT-2 style byte-level BPE (SmolLM2's kind): characters split across tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS[:2] * 3, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<eos>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def byte_fallback() -> PreTrainedTokenizerFast:
    """SentencePiece style (Llama 2's kind): ▁ for spaces, <0xNN> tokens for unknown bytes."""
    vocab = {"<unk>": 0, "<eos>": 1, **{f"<0x{b:02X}>": 2 + b for b in range(256)}}
    for word in "▁Hello ▁plain ▁ascii ▁words ▁only ▁here ▁done . ! e l o ▁".split():
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


class Counting:
    """A tokenizer that counts the ids it is asked to decode."""

    def __init__(self, tokenizer):
        self.tokenizer, self.decoded = tokenizer, 0

    def decode(self, ids, **kwargs):
        self.decoded += len(ids)
        return self.tokenizer.decode(ids, **kwargs)


def stream(tokenizer, ids) -> list[str]:
    detok = Detokenizer(tokenizer)
    pieces = [detok.add(t) for t in ids]
    return [p for p in pieces if p] + [detok.flush()], pieces


@pytest.mark.parametrize("make", [byte_level, byte_fallback])
@pytest.mark.parametrize("text", TEXTS)
def test_pieces_join_to_the_full_decode(make, text):
    tok = make()
    ids = tok.encode(text, add_special_tokens=False)
    joined, pieces = stream(tok, ids)
    assert "".join(joined) == tok.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in p for p in pieces)  # incomplete characters are held back
    if not text.isascii():  # some character really was split across tokens
        assert any(p == "" for p in pieces)


def test_split_characters_are_emitted_whole():
    tok = byte_fallback()
    ids = tok.encode("🤖", add_special_tokens=False)
    assert len(ids) >= 4  # four <0xNN> byte tokens
    detok = Detokenizer(tok)
    out = [detok.add(t) for t in ids]
    assert out[:-1] == [""] * (len(ids) - 1) and out[-1].strip() == "🤖"


def test_special_tokens_give_no_text():
    tok = byte_level()
    ids = tok.encode("hi", add_special_tokens=False) + [tok.eos_token_id]
    joined, _ = stream(tok, ids)
    assert "".join(joined) == tok.decode(ids[:-1])


def test_cost_is_linear_in_the_tokens():
    tok = byte_level()
    ids = tok.encode(" ".join(TEXTS) * 40, add_special_tokens=False)
    assert len(ids) > 2000
    counting = Counting(tok)
    detok = Detokenizer(counting)
    text = "".join(detok.add(t) for t in ids) + detok.flush()
    assert text == tok.decode(ids)
    # Each token is decoded in a window of a few tokens (twice: the done part and the whole);
    # re-decoding everything each time would cost ~len(ids)^2 / 2.
    assert counting.decoded <= 12 * len(ids)
