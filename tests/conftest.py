import os

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from hasten.paths import kernel_root
from tiny import hf_reference, tiny_config

# One kernel build for the whole run: many tests (and the processes they start) point
# HASTEN_CACHE at a fresh folder, and each would compile the kernels again there.
os.environ.setdefault("HASTEN_KERNEL_CACHE", str(kernel_root()))

WORDS = "the a cat dog sat ran on under mat log and then it was big small".split()


@pytest.fixture(autouse=True)
def one_thread_for_tiny_models(request):
    """Tiny tensors run on one thread: OpenMP spin-waits make two threads up to 30x slower on a
    busy 2-core machine. Tests on the real model (marked slow) keep torch's default."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A tiny random Llama as a Hugging Face folder (config.json + safetensors + a word-level
    tokenizer over WORDS): all `hasten.load(path)` needs."""
    folder = tmp_path_factory.mktemp("tiny-hf")
    hf_reference(tiny_config(), dtype=torch.float32).save_pretrained(folder)
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk).save_pretrained(folder)
    return folder
