"""Fixtures for rpo_jax.data tests: tokenizers built offline, JSONL writers."""

from __future__ import annotations

import json
import pathlib

import pytest

WORDS_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|im_start|>{{ message['role'] }} {{ message['content'] }}<|im_end|>"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant{% endif %}"
)
WORDS_SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>", "<|im_start|>", "<|im_end|>"]
WORDS_CORPUS = [
    "the cat sat on the mat",
    "what is two plus two",
    "four five six",
    "user assistant system",
    "hello there how are you",
    "i am fine thanks",
    "the dog ran",
    "answer question",
]


@pytest.fixture(scope="session")
def words_tokenizer_dir(tmp_path_factory) -> pathlib.Path:
    """A word-level tokenizer trained offline on a tiny corpus: whitespace split, BOS prepended,
    ``<|im_end|>`` as EOS, a chat template (``<|im_start|>role content<|im_end|>`` per message)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(WORDS_CORPUS, trainers.WordLevelTrainer(special_tokens=WORDS_SPECIALS))
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<|im_end|>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = WORDS_CHAT_TEMPLATE
    out = tmp_path_factory.mktemp("words_tokenizer")
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def words_tokenizer(words_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(words_tokenizer_dir)


@pytest.fixture(scope="session")
def demo_tokenizer():
    from transformers import AutoTokenizer

    from rpo_jax.data import demo_paths

    return AutoTokenizer.from_pretrained(demo_paths()["tokenizer"])


def _write_lines(path: pathlib.Path, lines: list) -> pathlib.Path:
    """Write JSON objects (dicts), raw strings or raw bytes one per line."""
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, bytes):
                f.write(line + b"\n")
            elif isinstance(line, str):
                f.write(line.encode("utf-8") + b"\n")
            else:
                f.write(json.dumps(line).encode("utf-8") + b"\n")
    return path


@pytest.fixture
def write_lines():
    """``write_lines(path, lines)``: JSON objects, raw strings or raw bytes, one per line; returns path."""
    return _write_lines
