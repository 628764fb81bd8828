"""Sequence-classification reward models: `RewardModel` and `create_` / `load_` / `save_reward_model`.

Hugging Face sequence-classification reward models (`LlamaForSequenceClassification`,
`GemmaForSequenceClassification`, `Gemma2ForSequenceClassification`, `Gemma3TextForSequenceClassification`,
`Qwen2ForSequenceClassification`, `Qwen3ForSequenceClassification`, `MistralForSequenceClassification`):

    scores[n] = score.weight · h[n, i_n]        score.weight [num_labels, D] (no bias), h = final-normed hidden states

where i_n is transformers' pooling index (`GenericForSequenceClassification` in transformers 5):

    pad_token_id set:   i_n = argmax_t (t · [tokens[n,t] != pad_token_id])   the rightmost non-pad token, so
                        left and right padding both work; the attention mask plays no part in the choice, a real
                        token equal to pad_token_id at the end of a sequence is skipped, and an all-pad row gives 0.
    pad_token_id None:  transformers pools the last position and refuses batches of more than one sequence; here
                        the last position whose attention_mask is True (the last position when no mask is given),
                        which is the same for every unpadded sequence.

The transformer is the ordinary `Decoder` (`hidden_states`); only the score head is new. The reward functions
(`RewardFn`, `reward_model_fn`, `judge_fn`, `dataset_rewards_fn`) live in `rpo_jax.models.reward_functions`.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rpo_jax.models.config import SEQUENCE_CLASSIFICATION_ARCHITECTURES, ModelConfig
from rpo_jax.models.hf_export import DEFAULT_MAX_SHARD_SIZE, save_hf
from rpo_jax.models.hf_io import SafetensorsIndex, load_hf, read_config_json, resolve_checkpoint_dir
from rpo_jax.models.model import Decoder
from rpo_jax.models.sharding import Rules, shard_model, variable_sharding

#: Hugging Face sequence-classification architectures → the model_type their config must have.
REWARD_ARCHITECTURES: dict[str, str] = SEQUENCE_CLASSIFICATION_ARCHITECTURES
_ARCHITECTURE_OF = {model_type: arch for arch, model_type in REWARD_ARCHITECTURES.items()}
SCORE_TENSOR = "score.weight"

# ----------------------------------------------------------------------------------------------- the model


def backbone_config(config: ModelConfig) -> ModelConfig:
    """The decoder config of a reward model: `config` without an output projection (tie_word_embeddings=True,
    so no `lm_head` parameter exists; a reward model never unembeds)."""
    return dataclasses.replace(config, tie_word_embeddings=True)


def pooling_index(tokens: jax.Array, attention_mask: jax.Array | None, pad_token_id: int | None) -> jax.Array:
    """[N,T] → [N] int32: the position whose hidden state is scored (rule in the module docstring)."""
    n, t = tokens.shape
    positions = jnp.arange(t, dtype=jnp.int32)
    if pad_token_id is not None:
        keep = tokens != pad_token_id
    elif attention_mask is not None:
        keep = jnp.asarray(attention_mask).astype(bool)
    else:
        return jnp.full((n,), t - 1, jnp.int32)
    return jnp.argmax(positions * keep.astype(jnp.int32), axis=-1).astype(jnp.int32)


class RewardModel(nnx.Module):
    """A sequence-classification reward model: `Decoder` backbone + linear head `score [num_labels, D]`.

    `model(tokens [N,T] int32, attention_mask [N,T] | None) -> scores [N, num_labels] float32`.
    Attributes: `backbone` (Decoder, built from `backbone_config(config)`), `score` (nnx.Param), `config` (the
    checkpoint's ModelConfig), `num_labels`, `labels` (id2label names), `pad_token_id` (config.pad_token_id).
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        num_labels: int = 1,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=None,
        labels: Sequence[str] | None = None,
        backbone: Decoder | None = None,
        score_weight: jax.Array | None = None,
    ):
        if num_labels < 1:
            raise ValueError(f"num_labels={num_labels} must be >= 1")
        labels = tuple(labels) if labels is not None else tuple(f"LABEL_{i}" for i in range(num_labels))
        if len(labels) != num_labels:
            raise ValueError(f"{len(labels)} label names for num_labels={num_labels}")
        self.config = config
        self.num_labels = int(num_labels)
        self.labels = labels
        self.pad_token_id = config.pad_token_id
        self.dtype = jnp.dtype(dtype)
        self.param_dtype = jnp.dtype(param_dtype or dtype)
        with nnx.use_eager_sharding(False):
            if backbone is None:
                backbone = Decoder(backbone_config(config), rngs=rngs, dtype=dtype, param_dtype=param_dtype)
            if score_weight is None:
                score_weight = (0.02 * jax.random.normal(rngs.params(), (num_labels, config.hidden_size))).astype(
                    self.param_dtype
                )
            want = (num_labels, config.hidden_size)
            if tuple(score_weight.shape) != want:
                raise ValueError(f"score weight has shape {list(score_weight.shape)}, expected {list(want)}")
            self.backbone = backbone
            self.score = nnx.Param(score_weight, out_sharding=("labels", "embed"))

    def score_hidden(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., D] → scores [..., num_labels] float32 (score · h, accumulated in float32)."""
        weight = self.score[...].astype(hidden.dtype)
        return jnp.einsum("...d,ld->...l", hidden, weight, preferred_element_type=jnp.float32)

    def __call__(self, tokens: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """tokens [N,T] int32, attention_mask [N,T] bool/int (None: all real) → scores [N, num_labels] float32."""
        tokens = jnp.asarray(tokens)
        hidden = self.backbone.hidden_states(tokens, attention_mask)  # [N,T,D]
        index = pooling_index(tokens, attention_mask, self.pad_token_id)
        pooled = jnp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0]  # [N,D]
        return self.score_hidden(pooled)


def create_reward_model(
    config: ModelConfig,
    *,
    num_labels: int = 1,
    rngs: nnx.Rngs,
    dtype=jnp.float32,
    param_dtype=None,
    mesh: jax.sharding.Mesh | None = None,
    rules: Rules | None = None,
) -> RewardModel:
    """A randomly initialised `RewardModel` (backbone as `Decoder.__init__`, score N(0, 0.02²)).

    Args:
        config: the backbone's architecture.
        num_labels: the score head's outputs.
        rngs: the random streams, e.g. `nnx.Rngs(0)`.
        dtype: the compute dtype.
        param_dtype: the parameters' dtype (`None`: `dtype`).
        mesh: move every parameter to its rule-given sharding on this mesh.
        rules: logical axis → mesh axis; default `DEFAULT_RULES`.

    Returns:
        The `RewardModel`.
    """
    model = RewardModel(config, num_labels=num_labels, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    return shard_model(model, mesh, rules) if mesh is not None else model


# ----------------------------------------------------------------------------------------------- load / save


def _labels_from_hf(hf: Mapping[str, Any], num_labels: int, source: str) -> tuple[str, ...]:
    id2label = hf.get("id2label")
    if id2label is None:  # transformers omits id2label at its default, num_labels = 2
        declared = int(hf.get("num_labels", 2))
        if declared != num_labels:
            raise ValueError(
                f"{source}: num_labels={declared} (transformers' default 2 when config.json has neither id2label "
                f"nor num_labels) but {SCORE_TENSOR} has {num_labels} rows"
            )
        return tuple(f"LABEL_{i}" for i in range(num_labels))
    if len(id2label) != num_labels:
        raise ValueError(f"{source}: id2label has {len(id2label)} labels but {SCORE_TENSOR} has {num_labels} rows")
    return tuple(str(id2label[k]) for k in sorted(id2label, key=int))


def load_reward_model(
    path: str | os.PathLike,
    *,
    dtype=jnp.float32,
    param_dtype=None,
    mesh: jax.sharding.Mesh | None = None,
    rules: Rules | None = None,
) -> tuple[RewardModel, ModelConfig]:
    """Loads a Hugging Face `XForSequenceClassification` reward model (see `REWARD_ARCHITECTURES`).

    The decoder is read by `load_hf` (same key table, sharding and dtypes); the head is `score.weight
    [num_labels, D]`.

    Args:
        path: a local directory or a URL.
        dtype: the compute dtype.
        param_dtype: the storage dtype (default `dtype`).
        mesh: create each parameter in its `rules` sharding on this mesh.
        rules: logical axis → mesh axis; default `DEFAULT_RULES`.

    Returns:
        `(model, config)`: the `RewardModel` and its backbone's `ModelConfig`.

    Raises:
        ValueError: naming the file, for no or an unknown `architectures` entry, a causal-LM checkpoint (no score
            head), a missing / mis-shaped `score.weight`, label-count mismatches, and every broken directory,
            config.json or safetensors file `load_hf` reports.
    """
    directory = resolve_checkpoint_dir(path)
    config_file, hf = read_config_json(directory)
    architectures = hf.get("architectures") or []
    if not isinstance(architectures, list) or len(architectures) != 1:
        raise ValueError(
            f"{config_file}: architectures={architectures!r}; expected exactly one of {sorted(REWARD_ARCHITECTURES)}"
        )
    arch = architectures[0]
    if arch not in REWARD_ARCHITECTURES:
        hint = (
            " — a causal language model has no score head; a reward model is an XForSequenceClassification checkpoint"
            if isinstance(arch, str) and arch.endswith(("ForCausalLM", "ForConditionalGeneration"))
            else ""
        )
        raise ValueError(
            f"{config_file}: architectures={arch!r} is not a supported reward model "
            f"({', '.join(sorted(REWARD_ARCHITECTURES))}){hint}"
        )
    if hf.get("model_type") != REWARD_ARCHITECTURES[arch]:
        raise ValueError(
            f"{config_file}: model_type={hf.get('model_type')!r} does not match architectures={arch!r} "
            f"(expected {REWARD_ARCHITECTURES[arch]!r})"
        )
    tensors = SafetensorsIndex(directory)
    if SCORE_TENSOR not in tensors.keys():
        raise ValueError(
            f"{directory}: tensor {SCORE_TENSOR} is missing; a sequence-classification reward model needs its "
            "score head (is this a causal-LM checkpoint relabelled as a classifier?)"
        )
    config = ModelConfig.from_hf_dict(hf, source=str(config_file))
    score = tensors.get_slice(SCORE_TENSOR)
    score_shape = tuple(score.get_shape())
    if len(score_shape) != 2 or score_shape[1] != config.hidden_size or score_shape[0] < 1:
        raise ValueError(
            f"{tensors.file_of(SCORE_TENSOR)}: tensor {SCORE_TENSOR} has shape {list(score_shape)}, "
            f"expected [num_labels, {config.hidden_size}]"
        )
    if score.get_dtype() not in ("F16", "BF16", "F32", "F64"):
        raise ValueError(
            f"{tensors.file_of(SCORE_TENSOR)}: tensor {SCORE_TENSOR} has dtype {score.get_dtype()}, expected a "
            "floating-point dtype (F16, BF16, F32, F64)"
        )
    num_labels = score_shape[0]
    labels = _labels_from_hf(hf, num_labels, str(config_file))

    backbone, loaded = load_hf(
        directory,
        dtype=dtype,
        param_dtype=param_dtype,
        mesh=mesh,
        rules=rules,
        extra_tensors=(SCORE_TENSOR,),
        task="sequence_classification",
        tie_word_embeddings=True,
    )
    if loaded != backbone_config(config):  # an invariant of load_hf; never expected
        raise RuntimeError(f"{config_file}: backbone config {loaded} differs from {backbone_config(config)}")
    pdt = jnp.dtype(param_dtype or dtype)
    weight = jnp.asarray(np.ascontiguousarray(tensors.get_slice(SCORE_TENSOR)[:, :]).astype(pdt))
    model = RewardModel(
        config,
        num_labels=num_labels,
        rngs=nnx.Rngs(0),
        dtype=dtype,
        param_dtype=pdt,
        labels=labels,
        backbone=backbone,
        score_weight=weight,
    )
    if mesh is not None:
        model.score.set_value(jax.device_put(model.score[...], variable_sharding(model.score, mesh, rules)))
    return model, config


def save_reward_model(
    model: RewardModel,
    config: ModelConfig,
    out_dir: str | os.PathLike,
    tokenizer=None,
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> pathlib.Path | str:
    """Writes a Hugging Face sequence-classification checkpoint (`config.json` + safetensors weights, sharded past
    `max_shard_size` (+ tokenizer files); streamed like `save_hf`, local or a URL) that
    `AutoModelForSequenceClassification.from_pretrained` loads with the same scores.

    Tensors keep the parameter dtype; config.json gets the `XForSequenceClassification` architecture,
    `id2label` / `label2id` from `model.labels` and `config.tie_word_embeddings`.

    Args:
        model: the `RewardModel`.
        config: its backbone's `ModelConfig`.
        out_dir: a local directory or a URL.
        tokenizer: also save this tokenizer's files (`None`: none).
        max_shard_size: bytes (or `"50GB"`-style) per safetensors shard.

    Returns:
        `out_dir`.
    """
    if config.model_type not in _ARCHITECTURE_OF:
        raise ValueError(f"save_reward_model: model_type {config.model_type!r} has no sequence-classification export")
    if backbone_config(config) != model.backbone.config:
        raise ValueError("save_reward_model: `config` does not describe `model` (backbone configs differ)")
    updates = {
        "architectures": [_ARCHITECTURE_OF[config.model_type]],
        "tie_word_embeddings": config.tie_word_embeddings,
        "id2label": {str(i): name for i, name in enumerate(model.labels)},
        "label2id": {name: i for i, name in enumerate(model.labels)},
    }
    return save_hf(
        model.backbone,
        backbone_config(config),
        out_dir,
        tokenizer,
        extra_tensors={SCORE_TENSOR: model.score[...]},
        max_shard_size=max_shard_size,
        config_updates=updates,
    )
