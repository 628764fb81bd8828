"""References of another model family with their own tokenizer (what the MRPO paper ran): a tiny Qwen2 second
reference for the tiny Llama policy of the trainer tests, through the reference cache and MRPO training."""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
from flax import nnx

from rpo_jax.data import demo_paths
from rpo_jax.models import save_hf
from rpo_jax.train.jobs import preference
from tests.hf_fixtures import make_tiny_family

from .trainer_testlib import read_metrics, tiny_config

ONE = jax.devices()[:1]
DEMO_TOKENIZER = pathlib.Path(demo_paths()["tokenizer"])
# A ChatML-like template: other tokens, other lengths than the demo tokenizer's "<|user|>...<|assistant|>...<eos>"
CHATML = (
    "{{ bos_token }}{% for message in messages %}{{ '<|im_start|><|' + message['role'] + '|>' + "
    "message['content'] + '<|im_end|>' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|><|assistant|>' }}{% endif %}"
)


def reversed_tokenizer(
    out_dir: pathlib.Path,
    *,
    chat_template: str | None = None,
    extra_special: tuple[str, ...] = (),
    eos_token: str | None = None,
) -> tuple[pathlib.Path, int]:
    """The demo character tokenizer with its V ids reversed (id i → V-1-i), plus `extra_special` tokens at ids
    V, V+1, ...; optionally another chat template and EOS. Returns (directory, V)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = json.loads((DEMO_TOKENIZER / "tokenizer.json").read_text())
    size = len(spec["model"]["vocab"])
    spec["model"]["vocab"] = {t: size - 1 - i for t, i in spec["model"]["vocab"].items()}
    for token in spec["added_tokens"]:
        token["id"] = size - 1 - token["id"]
    for token in spec["post_processor"]["special_tokens"].values():
        token["ids"] = [size - 1 - i for i in token["ids"]]
    for j, text in enumerate(extra_special):
        spec["model"]["vocab"][text] = size + j
        spec["added_tokens"].append(
            {
                "id": size + j,
                "content": text,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
        )
    (out_dir / "tokenizer.json").write_text(json.dumps(spec))
    config = json.loads((DEMO_TOKENIZER / "tokenizer_config.json").read_text())
    config["additional_special_tokens"] = list(config.get("additional_special_tokens", [])) + list(extra_special)
    if chat_template is not None:
        config["chat_template"] = chat_template
    if eos_token is not None:
        config["eos_token"] = eos_token
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config))
    return out_dir, size


def qwen2_copy_of_policy(run, out_dir: pathlib.Path, vocab_size_of_tokenizer: int) -> pathlib.Path:
    """The run's initial (Llama) policy as a Qwen2 checkpoint computing the same function under the reversed
    tokenizer: embedding rows of ids < V reversed, q/k/v biases zero (Qwen2 ≡ Llama then)."""
    from safetensors.numpy import load_file, save_file

    model = nnx.merge(run.graphdef, run.state["params"], run.rest)
    llama = save_hf(model, run.model_config, out_dir)
    tensors = load_file(str(llama / "model.safetensors"))
    order = np.arange(run.model_config.vocab_size)
    order[:vocab_size_of_tokenizer] = order[:vocab_size_of_tokenizer][::-1]
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in tensors:
            tensors[name] = np.ascontiguousarray(tensors[name][order])
    c = run.model_config
    for i in range(c.num_layers):
        for proj, heads in (("q", c.num_heads), ("k", c.num_kv_heads), ("v", c.num_kv_heads)):
            tensors[f"model.layers.{i}.self_attn.{proj}_proj.bias"] = np.zeros(heads * c.head_dim, np.float32)
    save_file(tensors, str(llama / "model.safetensors"), metadata={"format": "pt"})
    hf = json.loads((llama / "config.json").read_text())
    for key in ("attention_bias", "mlp_bias"):
        hf.pop(key, None)
    flip = lambda i: None if i is None else int(order[i])  # noqa: E731
    hf.update(
        model_type="qwen2",
        architectures=["Qwen2ForCausalLM"],
        use_sliding_window=False,
        bos_token_id=flip(hf.get("bos_token_id")),
        eos_token_id=flip(hf.get("eos_token_id")),
        pad_token_id=flip(hf.get("pad_token_id")),
    )
    (llama / "config.json").write_text(json.dumps(hf))
    return llama


def test_qwen2_reference_with_its_own_tokenizer_caches_transformers_log_probs(tmp_path):
    """The second reference (a random, windowed Qwen2 with q/k/v biases and a ChatML-like template over another
    vocabulary) is scored on its own tokenization; its cached column equals transformers' Qwen2ForCausalLM
    log-probs of those tokens. (Training with a mixed-family reference: the next test.)"""
    import torch
    from transformers import AutoModelForCausalLM

    tok_dir, size = reversed_tokenizer(
        tmp_path / "qwen_tok",
        chat_template=CHATML,
        extra_special=("<|im_start|>", "<|im_end|>"),
        eos_token="<|im_end|>",
    )
    qwen = make_tiny_family(
        tmp_path / "qwen",
        "qwen2",
        vocab_size=size + 2,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_hidden_layers=3,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=1,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
    )
    cfg = tiny_config(
        tmp_path / "data",
        **{
            "data.pairs": "best_worst",
            "reference_cache_dir": str(tmp_path / "cache"),
            "loss.name": "mrpo",
            "loss.hparams": {"beta": 0.1, "alpha": None, "epsilon": 0.1},
            "references": [{"path": "", "tokenizer": ""}, {"path": str(qwen), "tokenizer": str(tok_dir)}],
        },
    )
    run = preference.build_run(cfg, tmp_path / "run", devices=ONE)
    assert run.model_config.model_type == "llama"
    reference = run.references[1]
    assert reference.datasets is not run.datasets  # re-tokenized with the Qwen tokenizer
    ours, theirs = run.datasets["eval"].examples[0], reference.datasets["eval"].examples[0]
    assert ours.index == theirs.index and len(theirs.sequences[0]) != len(ours.sequences[0])

    preference.fill_reference_cache(run)
    cache = run.ref_cache["eval"]
    assert cache.shape[-1] == 2
    torch_model = AutoModelForCausalLM.from_pretrained(
        str(qwen), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    checked = 0
    for e in reference.datasets["eval"].examples:
        for k, (seq, p) in enumerate(zip(e.sequences, e.prompt_lengths)):
            with torch.no_grad():
                logits = torch_model(input_ids=torch.as_tensor([list(seq)], dtype=torch.long)).logits[0]
            logp = torch.log_softmax(logits.double(), -1)
            expected = sum(float(logp[t - 1, seq[t]]) for t in range(p, len(seq)))
            np.testing.assert_allclose(cache[e.index, k, 1], expected, rtol=0, atol=1e-4)
            checked += 1
    assert checked >= 20 and len(seq) > 8  # sequences longer than the window
    assert len(list((tmp_path / "cache").glob("train-*.npy"))) == 2  # one cache file per reference


def test_mrpo_with_a_function_equal_qwen2_reference_trains_exactly_like_dpo(tmp_path):
    """MRPO's limit (identical references ⇒ DPO) across families and tokenizers: the second reference is a Qwen2
    checkpoint (zero biases) of the initial Llama policy whose vocabulary is reversed, read with the reversed
    tokenizer. It computes the same log-probs from other token ids, so MRPO's losses equal DPO's."""
    common = {"data.pairs": "best_worst", "train.steps": 3}
    dpo = tiny_config(tmp_path / "data", **common, **{"loss.name": "dpo", "loss.hparams": {"beta": 0.1}})
    run = preference.build_run(dpo, tmp_path / "probe", devices=ONE)
    tok_dir, size = reversed_tokenizer(tmp_path / "reversed_tok")
    qwen = qwen2_copy_of_policy(run, tmp_path / "qwen", size)
    mrpo = tiny_config(
        tmp_path / "data",
        **common,
        **{
            "loss.name": "mrpo",
            "loss.hparams": {"beta": 0.1, "alpha": None, "epsilon": 0.1},
            "reference_cache_dir": str(tmp_path / "cache"),  # filled once below, reused by the training run
            "references": [{"path": "", "tokenizer": ""}, {"path": str(qwen), "tokenizer": str(tok_dir)}],
        },
    )
    mixed = preference.build_run(mrpo, tmp_path / "mixed_probe", devices=ONE)
    ours, theirs = mixed.datasets["train"].examples[0], mixed.references[1].datasets["train"].examples[0]
    flipped = [size - 1 - t for t in ours.sequences[0]]
    assert list(theirs.sequences[0]) == flipped != list(ours.sequences[0])  # other ids, same text
    preference.fill_reference_cache(mixed)
    np.testing.assert_allclose(mixed.ref_cache["train"][..., 1], mixed.ref_cache["train"][..., 0], rtol=1e-5, atol=1e-5)

    preference.train(dpo, tmp_path / "dpo", devices=ONE)
    preference.train(mrpo, tmp_path / "mrpo", devices=ONE)
    a = [m["train/loss"] for m in read_metrics(tmp_path / "dpo") if "train/loss" in m]
    b = [m["train/loss"] for m in read_metrics(tmp_path / "mrpo") if "train/loss" in m]
    assert len(a) == 3
    np.testing.assert_allclose(a, b, rtol=1e-5)
