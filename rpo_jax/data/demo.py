"""The bundled demo task: "sort these digits", with a programmatic judge and a tiny character-level tokenizer.

Prompt (one user message): ``sort: 7 2 9 4`` (3 to 8 digits, repeats allowed). Ideal response: ``2 4 7 9``.

Judge (:func:`judge`), in [0, 1]: the response is split on whitespace; if it is empty or any item is not a
single digit it scores 0. Otherwise, with ``p`` the prompt's digits and ``r`` the response's digits,

    digits = |multiset(p) ∩ multiset(r)| / max(len(p), len(r))
    order  = #{i : r[i] <= r[i+1]} / (len(r) - 1)          (0 when len(r) < 2)
    judge  = 0.5 * digits + 0.5 * order

so the sorted answer scores exactly 1 and extra, missing, wrong or misordered digits each cost reward.

Each prompt gets K = 4 distinct responses from a corruption process (the perfect answer and three of: one
adjacent swap, one wrong digit, one dropped digit, one duplicated digit, a shuffle, the reverse, garbage
letters), in random order; rewards are ``round(judge(prompt, response), 4)``. Files are written in the
K-responses format with a conversational prompt, so the chat-template path is exercised:

    {"prompt": [{"role": "user", "content": "sort: 7 2 9 4"}], "responses": ["2 4 7 9", ...], "rewards": [1.0, ...]}

Regenerate (byte-identical to the bundled files): ``python -m rpo_jax.data.demo --out DIR``.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib

import numpy as np

#: The bundled demo task: `train.jsonl`, `test.jsonl` and the character-level `tokenizer/`.
DEMO_DIR = pathlib.Path(__file__).resolve().parent / "demo_data"
SEED = 20240601
NUM_TRAIN = 2000
NUM_TEST = 200
K = 4
MIN_DIGITS, MAX_DIGITS = 3, 8

# The tokenizer: every character is one token; roles are single special tokens.
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>")
CHARACTERS = tuple(" 0123456789abcdefghijklmnopqrstuvwxyz:.,?!-'\n")
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def demo_paths(directory: str | pathlib.Path | None = None) -> dict[str, str]:
    """Paths of the demo files.

    Args:
        directory: where the demo files are (`None`: the bundled copy, `DEMO_DIR`).

    Returns:
        `{"train": ..., "test": ..., "tokenizer": ...}`.
    """
    d = pathlib.Path(directory) if directory is not None else DEMO_DIR
    return {"train": str(d / "train.jsonl"), "test": str(d / "test.jsonl"), "tokenizer": str(d / "tokenizer")}


def prompt_digits(prompt: str) -> list[str]:
    """The digits of a demo prompt ``"sort: 7 2 9 4"`` -> ``["7", "2", "9", "4"]``; ValueError otherwise."""
    head, sep, rest = prompt.strip().partition(":")
    digits = rest.split()
    if head.strip() != "sort" or not sep or not digits or not all(len(d) == 1 and d.isdigit() for d in digits):
        raise ValueError(f"not a demo prompt (expected 'sort: d d d ...'): {prompt!r}")
    return digits


def judge(prompt: str, response: str) -> float:
    """The demo task's ground-truth reward (formula in the module docstring).

    Args:
        prompt: a demo prompt, `"sort: 7 2 9 4"`.
        response: the response text.

    Returns:
        The reward in [0, 1] (1 for the sorted digits).
    """
    p = prompt_digits(prompt)
    r = response.split()
    if not r or not all(len(x) == 1 and x.isdigit() for x in r):
        return 0.0
    matched = sum((collections.Counter(p) & collections.Counter(r)).values())
    digits = matched / max(len(p), len(r))
    order = sum(a <= b for a, b in zip(r, r[1:])) / (len(r) - 1) if len(r) >= 2 else 0.0
    return 0.5 * digits + 0.5 * order


def _corruptions(digits: list[str], rng: np.random.Generator) -> dict[str, list[str]]:
    """Candidate responses (as digit lists, or letters for garbage) by corruption kind."""
    s = sorted(digits)
    n = len(s)
    out: dict[str, list[str]] = {}
    i = int(rng.integers(n - 1))
    out["swap"] = s[:i] + [s[i + 1], s[i]] + s[i + 2 :]
    j = int(rng.integers(n))
    wrong = str((int(s[j]) + int(rng.integers(1, 10))) % 10)
    out["wrong_digit"] = sorted(s[:j] + [wrong] + s[j + 1 :])
    j = int(rng.integers(n))
    out["drop"] = s[:j] + s[j + 1 :]
    j = int(rng.integers(n))
    out["duplicate"] = s[: j + 1] + [s[j]] + s[j + 1 :]
    out["shuffle"] = [s[k] for k in rng.permutation(n)]
    out["reverse"] = s[::-1]
    out["garbage"] = [chr(ord("a") + int(c)) for c in rng.integers(0, 26, size=n)]
    return out


def make_example(rng: np.random.Generator) -> dict:
    """One K-responses JSON object: conversational prompt, K distinct responses, judge rewards (4 decimals)."""
    n = int(rng.integers(MIN_DIGITS, MAX_DIGITS + 1))
    digits = [str(d) for d in rng.integers(0, 10, size=n)]
    prompt = "sort: " + " ".join(digits)
    perfect = " ".join(sorted(digits))
    candidates = _corruptions(digits, rng)
    kinds = list(candidates)
    best: list[str] | None = None
    for _ in range(8):  # prefer distinct responses with distinct rewards; ties stay rare, not forbidden
        chosen = [kinds[k] for k in rng.choice(len(kinds), size=K - 1, replace=False)]
        texts = [perfect] + [" ".join(candidates[k]) if k != "garbage" else "".join(candidates[k]) for k in chosen]
        if len(set(texts)) < K:
            continue
        best = texts
        if len({round(judge(prompt, t), 4) for t in texts}) == K:
            break
    if best is None:  # every draw repeated a response: fall back to distinct garbage strings
        best = [perfect] + [
            "".join(chr(ord("a") + int(c)) for c in rng.integers(0, 26, size=n)) + str(k) for k in range(K - 1)
        ]
    order = rng.permutation(K)
    responses = [best[k] for k in order]
    rewards = [round(judge(prompt, t), 4) for t in responses]
    return {"prompt": [{"role": "user", "content": prompt}], "responses": responses, "rewards": rewards}


def build_tokenizer(out_dir: str | pathlib.Path) -> None:
    """Write the character-level demo tokenizer (``tokenizer.json`` + ``tokenizer_config.json``) to ``out_dir``.

    Vocabulary: 7 special tokens then one token per character of ``CHARACTERS`` (< 64 in all); a BOS is
    prepended when tokenizing plain text with ``add_special_tokens=True``; decoding joins characters.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "additional_special_tokens": list(SPECIAL_TOKENS[4:]),
        "model_max_length": 64,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def write_demo(
    out_dir: str | pathlib.Path, *, seed: int = SEED, num_train: int = NUM_TRAIN, num_test: int = NUM_TEST
) -> dict[str, str]:
    """Generate ``train.jsonl``, ``test.jsonl`` and ``tokenizer/`` into ``out_dir`` deterministically."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    seen: set[str] = set()
    for name, n in (("train", num_train), ("test", num_test)):
        lines = []
        while len(lines) < n:
            ex = make_example(rng)
            key = ex["prompt"][0]["content"]
            if key in seen:  # the test split never repeats a training prompt
                continue
            seen.add(key)
            lines.append(json.dumps(ex, separators=(",", ":")))
        (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    build_tokenizer(out / "tokenizer")
    return demo_paths(out)


def main(argv: list[str] | None = None) -> None:
    """``python -m rpo_jax.data.demo --out DIR``: regenerate the demo data."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEMO_DIR), help="output directory (default: the bundled copy)")
    args = parser.parse_args(argv)
    paths = write_demo(args.out)
    print("\n".join(f"{k}: {v}" for k, v in paths.items()))


if __name__ == "__main__":
    main()
