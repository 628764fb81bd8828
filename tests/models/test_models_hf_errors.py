"""Broken checkpoint directories name themselves (directory, file and what is wrong / expected), and exports get
the process's normal file mode. Every broken directory is built from a valid tiny checkpoint."""

from __future__ import annotations

import json
import os
import re
import stat

import numpy as np
import pytest

from rpo_jax.models import load_hf, load_reward_model, save_hf, save_reward_model
from tests.hf_fixtures import copy_checkpoint, edit_config, make_tiny_llama

LOADERS = {"load_hf": load_hf, "load_reward_model": load_reward_model}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory):
    path = make_tiny_llama(tmp_path_factory.mktemp("sharded"), max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").exists()
    return path


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory, llama_dir):
    """A LlamaForSequenceClassification checkpoint: the tiny Llama with a score head instead of lm_head."""
    from safetensors.numpy import load_file, save_file

    out = copy_checkpoint(llama_dir, tmp_path_factory.mktemp("reward") / "rm")
    tensors = load_file(str(out / "model.safetensors"))
    del tensors["lm_head.weight"]
    tensors["score.weight"] = np.random.RandomState(0).normal(size=(1, 64)).astype(np.float32)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    edit_config(
        out, architectures=["LlamaForSequenceClassification"], id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}
    )
    return out


@pytest.fixture(scope="module")
def llama(llama_dir):
    return load_hf(llama_dir)


def _raises(exc, fn, path, *fragments):
    """Calls fn(path); the one-line message must contain every fragment (taken literally, in order)."""
    pattern = ".*".join(re.escape(str(f)) for f in fragments)
    with pytest.raises(exc, match=pattern) as info:
        fn(path)
    assert "\n" not in str(info.value), str(info.value)
    return str(info.value)


# --------------------------------------------------------------------------------------------- directory


@pytest.mark.parametrize("loader", LOADERS)
def test_missing_directory_and_plain_file(loader, tmp_path):
    _raises(
        FileNotFoundError,
        LOADERS[loader],
        tmp_path / "nope",
        f"checkpoint directory '{tmp_path / 'nope'}'",
        "does not exist",
    )
    (tmp_path / "file").write_text("x")
    _raises(
        NotADirectoryError,
        LOADERS[loader],
        tmp_path / "file",
        str(tmp_path / "file"),
        "is not a directory",
        "expected a Hugging Face checkpoint directory",
    )


@pytest.mark.parametrize("loader", LOADERS)
def test_directory_without_config_json(loader, llama_dir, reward_dir, tmp_path):
    d = copy_checkpoint(reward_dir if loader == "load_reward_model" else llama_dir, tmp_path / "c")
    (d / "config.json").unlink()
    _raises(
        FileNotFoundError, LOADERS[loader], d, f"{d}: config.json is missing", "expected", "found", "model.safetensors"
    )


@pytest.mark.parametrize("loader", LOADERS)
def test_directory_without_safetensors(loader, llama_dir, reward_dir, tmp_path):
    d = copy_checkpoint(reward_dir if loader == "load_reward_model" else llama_dir, tmp_path / "s")
    (d / "model.safetensors").unlink()
    _raises(
        FileNotFoundError,
        LOADERS[loader],
        d,
        f"{d}: no model.safetensors or model.safetensors.index.json",
        "found ['config.json', 'generation_config.json']",
        "expected",
    )


def test_index_naming_a_missing_shard(sharded_dir, tmp_path):
    d = copy_checkpoint(sharded_dir, tmp_path / "shards")
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    shard = sorted(set(index.values()))[-1]
    (d / shard).unlink()
    _raises(
        FileNotFoundError,
        load_hf,
        d,
        f"{d / 'model.safetensors.index.json'}: shard {shard} is missing",
        f"expected the file {d / shard}",
    )


def test_broken_index_file(sharded_dir, tmp_path):
    d = copy_checkpoint(sharded_dir, tmp_path / "index")
    index_file = d / "model.safetensors.index.json"
    good = json.loads(index_file.read_text())
    index_file.write_text('{"metadata": {},\n "weight_map": {"a": "b",}}')
    _raises(ValueError, load_hf, d, f"{index_file}: not valid JSON", "at line 2, column 26")
    index_file.write_text(json.dumps({"metadata": {}}))
    _raises(ValueError, load_hf, d, f"{index_file}: weight_map is missing", "expected an object")
    # a tensor the index puts in a shard that does not hold it
    moved = dict(good["weight_map"])
    name = "model.embed_tokens.weight"
    other = next(s for s in sorted(set(moved.values())) if s != moved[name])
    moved[name] = other
    index_file.write_text(json.dumps({**good, "weight_map": moved}))
    _raises(
        ValueError,
        load_hf,
        d,
        f"{d / other}: tensors ['{name}'] are missing",
        "model.safetensors.index.json puts them in this shard",
    )
    # a tensor a shard holds but the index does not list
    unlisted = dict(good["weight_map"])
    name = "model.layers.1.input_layernorm.weight"
    shard = unlisted.pop(name)
    assert shard in unlisted.values()  # the shard holds other, listed tensors
    index_file.write_text(json.dumps({**good, "weight_map": unlisted}))
    _raises(ValueError, load_hf, d, f"{d / shard}: tensors ['{name}'] are not listed for this shard in {index_file}")


# --------------------------------------------------------------------------------------------- config.json


@pytest.mark.parametrize("loader", LOADERS)
def test_config_json_not_json(loader, llama_dir, reward_dir, tmp_path):
    d = copy_checkpoint(reward_dir if loader == "load_reward_model" else llama_dir, tmp_path / "j")
    (d / "config.json").write_text('{\n  "model_type": "llama",\n  "hidden_size": 64,\n}\n')
    _raises(
        ValueError,
        LOADERS[loader],
        d,
        f"{d / 'config.json'}: not valid JSON",
        "Expecting property name enclosed in double quotes at line 4, column 1",
    )


@pytest.mark.parametrize("loader", LOADERS)
def test_config_json_not_an_object(loader, llama_dir, tmp_path):
    d = copy_checkpoint(llama_dir, tmp_path / "o")
    (d / "config.json").write_text("[1, 2]\n")
    _raises(ValueError, LOADERS[loader], d, f"{d / 'config.json'}: expected a JSON object", "found a JSON array")


def test_config_json_missing_or_bad_required_fields(llama_dir, tmp_path):
    d = copy_checkpoint(llama_dir, tmp_path / "f")
    cfg = d / "config.json"
    edit_config(d, drop=("hidden_size",))
    _raises(ValueError, load_hf, d, f"{cfg}: required field hidden_size is missing", "expected a positive integer")
    edit_config(d, drop=("num_hidden_layers", "vocab_size"), hidden_size=64)
    _raises(ValueError, load_hf, d, f"{cfg}: required fields num_hidden_layers, vocab_size are missing")
    edit_config(d, num_hidden_layers=2, vocab_size=256, intermediate_size=0)
    _raises(ValueError, load_hf, d, f"{cfg}: intermediate_size=0", "expected a positive integer")
    edit_config(d, intermediate_size="128")
    _raises(ValueError, load_hf, d, f"{cfg}: intermediate_size='128'", "expected a positive integer")
    edit_config(d, intermediate_size=128, num_key_value_heads=3)  # 4 heads: transformers accepts, we cannot
    _raises(ValueError, load_hf, d, str(cfg), "num_heads=4 is not a multiple of num_kv_heads=3")
    edit_config(d, num_key_value_heads=2, rms_norm_eps="tiny")  # transformers' own (multi-line) validation
    _raises(ValueError, load_hf, d, f"{cfg}: transformers rejected the configuration", "rms_norm_eps")


def test_gemma3_multimodal_text_config_required_fields():
    from rpo_jax.models import ModelConfig

    hf = {
        "model_type": "gemma3",
        "text_config": {"model_type": "gemma3_text", "intermediate_size": 128, "num_hidden_layers": 2},
    }
    with pytest.raises(ValueError, match=r"^cfg\.json: required field text_config\.hidden_size is missing"):
        ModelConfig.from_hf_dict(hf, source="cfg.json")


# --------------------------------------------------------------------------------------------- safetensors


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_unreadable_safetensors(loader, damage, llama_dir, reward_dir, tmp_path):
    d = copy_checkpoint(reward_dir if loader == "load_reward_model" else llama_dir, tmp_path / damage)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(
        {"truncated": data[: len(data) // 2], "garbage": b"<html>not found</html>" * 20, "empty": b""}[damage]
    )
    _raises(ValueError, LOADERS[loader], d, f"{f}: not a readable safetensors file (", "expected a complete")


def test_missing_tensor_names_file_and_expected_shape(llama_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    d = copy_checkpoint(llama_dir, tmp_path / "m")
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(d / "model.safetensors"))
    _raises(
        ValueError,
        load_hf,
        d,
        f"{d / 'model.safetensors'}: missing tensors ['model.layers.1.mlp.up_proj.weight']",
        "expected shapes [[128, 64]]",
        str(d / "config.json"),
    )
    del tensors["lm_head.weight"]
    save_file(tensors, str(d / "model.safetensors"))
    _raises(
        ValueError,
        load_hf,
        d,
        f"{d / 'model.safetensors'}: missing tensor lm_head.weight [256, 64]",
        "tie_word_embeddings=False",
    )


def test_wrong_shape_and_dtype_name_file_tensor_and_expectation(llama_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    d = copy_checkpoint(llama_dir, tmp_path / "w")
    tensors = load_file(str(d / "model.safetensors"))
    name = "model.layers.0.self_attn.k_proj.weight"
    good = tensors[name]
    tensors[name] = good[:16]
    save_file(tensors, str(d / "model.safetensors"))
    _raises(ValueError, load_hf, d, f"{d / 'model.safetensors'}: tensor {name} has shape [16, 64], expected [32, 64]")
    tensors[name] = (good * 100).astype(np.int32)
    save_file(tensors, str(d / "model.safetensors"))
    _raises(
        ValueError,
        load_hf,
        d,
        f"{d / 'model.safetensors'}: tensor {name} has dtype I32",
        "expected a floating-point dtype",
    )


# --------------------------------------------------------------------------------------------- architectures


def test_architectures_contradicting_model_type(llama_dir, tmp_path):
    d = copy_checkpoint(llama_dir, tmp_path / "a")
    edit_config(d, architectures=["GemmaForCausalLM"])
    _raises(
        ValueError,
        load_hf,
        d,
        f"{d / 'config.json'}: architectures=['GemmaForCausalLM'] contradicts model_type='llama'",
        "GemmaForCausalLM goes with model_type 'gemma'",
        "model_type 'llama' with LlamaForCausalLM",
    )


def test_unknown_and_wrong_task_architectures(llama_dir, reward_dir, tmp_path):
    d = copy_checkpoint(llama_dir, tmp_path / "u")
    edit_config(d, architectures=["PhiForCausalLM"])
    _raises(
        ValueError,
        load_hf,
        d,
        f"{d / 'config.json'}: architectures=['PhiForCausalLM'] is not a supported causal language model",
        "expected one of",
        "LlamaForCausalLM",
    )
    edit_config(d, architectures="LlamaForCausalLM")
    _raises(ValueError, load_hf, d, f"{d / 'config.json'}: architectures='LlamaForCausalLM'", "expected a list")
    # a reward model given to the causal-LM loader, by its declared class and (undeclared) by its score head
    _raises(
        ValueError,
        load_hf,
        reward_dir,
        f"{reward_dir / 'config.json'}: architectures="
        "['LlamaForSequenceClassification'] is a sequence-classification (reward) model",
        "load_reward_model",
    )
    r = copy_checkpoint(reward_dir, tmp_path / "r")
    edit_config(r, drop=("architectures",))
    _raises(
        ValueError,
        load_hf,
        r,
        f"{r / 'model.safetensors'}: missing tensor lm_head.weight",
        "score.weight is a sequence-classification head",
        "load_reward_model",
    )
    edit_config(r, tie_word_embeddings=True)
    _raises(
        ValueError, load_hf, r, f"{r / 'model.safetensors'}: unexpected tensors ['score.weight']", "load_reward_model"
    )


def test_architectures_may_be_absent(llama_dir, llama, tmp_path):
    d = copy_checkpoint(llama_dir, tmp_path / "n")
    edit_config(d, drop=("architectures",))
    _, config = load_hf(d)
    assert config == llama[1]


# --------------------------------------------------------------------------------------------- export


def _modes(directory):
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=oct)
def test_exported_files_get_the_normal_mode(umask, llama, tmp_path):
    from rpo_jax.models import create_reward_model

    model, config = llama
    rm = create_reward_model(config, rngs=__import__("flax").nnx.Rngs(0))
    old = os.umask(umask)
    try:
        out = save_hf(model, config, tmp_path / "policy")
        out_rm = save_reward_model(rm, config, tmp_path / "rm")
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    for directory in (out, out_rm):
        modes = _modes(directory)
        assert set(modes) >= {"config.json", "model.safetensors"}
        assert modes == {name: want for name in modes}, (oct(want), {k: oct(v) for k, v in modes.items()})


def test_save_hf_into_new_nested_and_empty_directories(llama, tmp_path):
    model, config = llama
    for out in (tmp_path / "a" / "b" / "new", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        save_hf(model, config, out)
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
        _, again = load_hf(out)
        assert again == config


def test_save_hf_refuses_a_file_and_a_stale_sharded_export(llama, sharded_dir, tmp_path):
    model, config = llama
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match=re.escape(f"{tmp_path / 'file'}: exists and is not a directory")):
        save_hf(model, config, tmp_path / "file")
    stale = copy_checkpoint(sharded_dir, tmp_path / "stale")
    with pytest.raises(
        ValueError,
        match=re.escape(f"{stale}: holds another safetensors checkpoint") + r".*model\.safetensors\.index\.json",
    ):
        save_hf(model, config, stale)
