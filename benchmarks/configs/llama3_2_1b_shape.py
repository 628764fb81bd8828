"""Llama-3.2-1B's shape with random weights (configs/architectures/llama-3.2-1b-instruct.json): the 1B recipe
(configs/llama3_2_1b.py: bfloat16, remat full, vocabulary chunks of 16,384) as a DPO run of 8 prompts a step on
one chip, without the checkpoint — `benchmarks/accelerator_check.py`'s train step.

hidden 2048, 16 layers, 32 heads (8 key/value heads, head_dim 64), MLP 8192, vocabulary 128,256, rope_theta
500,000 (llama3 rope scaling), tied embeddings.
"""

import importlib.util
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config():
    c = _recipe("llama3_2_1b")
    c.model.path = ""
    c.model.architecture = None
    c.model.init = json.loads((ROOT / "configs" / "architectures" / "llama-3.2-1b-instruct.json").read_text())
    c.loss.name = "dpo"
    c.loss.hparams = {"beta": 0.1}
    c.data.batch_size = 8
    c.data.micro_batches = 1
    c.data.eval_batch_size = 8
    c.mesh = {"data": -1, "fsdp": 1, "tensor": 1}
    return c
