"""Shared helpers for the trainer tests: a tiny config on a slice of the bundled demo data."""

from __future__ import annotations

import json
import os
import pathlib
import sys

import jax
import numpy as np

from rpo_jax.data import demo_paths
from rpo_jax.train.config.quickstart import get_config

TINY_MODEL = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "max_position_embeddings": 128,
}


def demo_slice(directory: pathlib.Path, n_train: int = 96, n_eval: int = 24) -> tuple[str, str]:
    """The first records of the bundled demo splits, written to `directory` (keeps tests fast)."""
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for split, n in (("train", n_train), ("test", n_eval)):
        lines = pathlib.Path(demo_paths()[split]).read_text().splitlines()[:n]
        path = directory / f"{split}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        out.append(str(path))
    return out[0], out[1]


def tiny_config(data_dir: pathlib.Path, **overrides):
    """The quickstart recipe shrunk: tiny Llama, 96 train / 24 eval records, a few steps, no progress bar."""
    train, evaluation = demo_slice(data_dir)
    c = get_config()
    c.model.init = dict(TINY_MODEL)
    c.data.train, c.data.eval = train, evaluation
    c.data.batch_size = 8
    c.data.eval_batch_size = 8
    c.train.steps = 6
    c.train.log_every = 1
    c.train.eval_every = 0
    c.train.checkpoint_every = 2
    c.train.progress_bar = False
    c.train.export_at_end = False
    c.metrics.peak_flops = 1e11
    c.metrics.tensorboard = False
    c.eval.generation.every = 0  # the quickstart's generation eval: tests/train/test_generation_eval.py
    return set_fields(c, overrides)


def set_fields(c, overrides: dict):
    """`c` with dotted-path fields set: ``{"online.iterations": 3, "loss.name": "rloo"}``."""
    for key, value in overrides.items():
        node = c
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return c


def load_recipe(name: str):
    """`get_config()` of configs/NAME.py."""
    import importlib.util

    path = pathlib.Path(__file__).resolve().parents[2] / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def read_metrics(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def final_params(workdir: pathlib.Path):
    """The newest checkpoint's parameters as numpy arrays (restored onto this process's first device)."""
    import orbax.checkpoint as ocp

    ckpt_dir = workdir / "checkpoints"
    step = max(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
    checkpointer = ocp.StandardCheckpointer()
    path = ckpt_dir / str(step) / "params"
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), checkpointer.metadata(path).item_metadata.tree
    )
    return jax.tree.map(np.asarray, checkpointer.restore(path, target))


# ------------------------------------------------------------------------------------- subprocess runs
def write_config(cfg, path: pathlib.Path) -> pathlib.Path:
    (path.parent / (path.stem + ".json")).write_text(cfg.to_json())
    path.write_text(
        "import json, pathlib\nfrom ml_collections import ConfigDict\n\n"
        "def get_config():\n"
        f"    return ConfigDict(json.loads(pathlib.Path({str(path.parent / (path.stem + '.json'))!r})"
        ".read_text()))\n"
    )
    return path


def subprocess_env(devices: int = 1, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RPO_JAX_COORDINATOR")}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env.update(extra)
    return env


def train_command(config_file: pathlib.Path, workdir: pathlib.Path) -> list[str]:
    return [sys.executable, "-m", "rpo_jax.train.cli", f"--config={config_file}", f"--workdir={workdir}"]


def steps_saved(workdir: pathlib.Path) -> list[int]:
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def save_tiny_base(root: pathlib.Path, **overrides) -> pathlib.Path:
    """`root` with a tiny random Llama saved as a Hugging Face checkpoint in `root/base` (the demo tokenizer with
    it) and the demo slice in `root/data`: the frozen base of the LoRA / QLoRA trainer tests. `overrides`: fields
    of `tiny_config` (e.g. `{"model.init_seed": 7}`: other weights)."""
    import jax.numpy as jnp

    from rpo_jax.models import save_hf
    from rpo_jax.train.build.data import load_tokenizer, tokenizer_path
    from rpo_jax.train.build.model import load_policy
    from rpo_jax.train.runtime.global_batches import config_mesh

    cfg = tiny_config(root / "data", **overrides)
    tok = load_tokenizer(tokenizer_path(cfg))
    model, mc = load_policy(cfg, tok, config_mesh(cfg.mesh, jax.devices()[:1]), jnp.float32)
    save_hf(model, mc, root / "base", tokenizer=tok)
    return root
