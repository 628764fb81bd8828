"""rpo_jax.data: preference records -> validated, tokenized, fixed-shape batches [B, K, T].

Read:      ``records, report = read_records(paths, format=None, on_error="raise", split=None)`` (files,
           directories, Hugging Face ``datasets`` objects or save_to_disk directories); prompts alone (online):
           ``prompts, report = read_prompts(paths)``, ``encode_prompt(prompt, tokenizer)``; unpaired records
           (KTO, BCO): ``read_unpaired_records(paths, unpair=False)``, ``unpair_records(pairs)``,
           ``label_balance(records)``, ``kto_weight_advice(balance, ...)``, ``one_class_warning(balance)``
Select:    ``to_pairs(records)``, ``holdout_split(records, fraction, seed=...)``, ``require_rewards(records)``;
           labels vs scores: ``label_score_counts(records)``, ``rewards_reach_loss(records, ...)``
Tokenize:  ``dataset = tokenize_records(records, tokenizer, max_length=..., truncation="drop")``; unpaired records
           (TRL's KTOTrainer recipe, mismatched completions for KTO): ``tokenize_unpaired(records, tokenizer, ...)``
Iterate:   ``make_train_iterator(dataset, batch_size, seed=...)`` (resumable), ``make_eval_batches(dataset, B)``
Pack:      ``make_train_iterator(..., packing=Packing(row_length, share_prompt=...))``; ``pack_batch(batch, packing)``
TFDS:      ``build_tfds(data_dir, sources=... | splits=...)``; ``load_tfds_records(data_dir, split)``.
Demo:      ``demo_paths()``, ``judge(prompt, response)``.

Names are imported lazily (``rpo_jax.data.records``, ``.prompts``, ``.unpaired`` and ``.selection`` need neither JAX
nor grain nor tfds).
"""

import importlib
from typing import Any

_EXPORTS = {
    "records": (
        "FORMATS",
        "NoRecordsError",
        "PreferenceRecord",
        "Problem",
        "ROLES",
        "ReadReport",
        "RecordError",
        "detect_format",
        "expand_sources",
        "parse_record",
        "read_records",
        "resolve_sources",
    ),
    "prompts": ("PromptRecord", "read_prompts"),
    "unpaired": (
        "LabelBalance",
        "UnpairedRecord",
        "kto_weight_advice",
        "label_balance",
        "one_class_warning",
        "read_unpaired_records",
        "unpair_records",
    ),
    "unpaired_tokenize": ("UnpairedDataset", "tokenize_unpaired"),
    "selection": (
        "PAIRS_FROM",
        "LabelScoreCounts",
        "holdout_split",
        "label_score_counts",
        "require_rewards",
        "rewards_reach_loss",
        "to_pairs",
    ),
    "tokenize": (
        "TRUNCATION_POLICIES",
        "TokenizedDataset",
        "TokenizedExample",
        "TokenizeReport",
        "bucket_for",
        "collate_examples",
        "default_buckets",
        "encode_prompt",
        "encode_record",
        "tokenize_records",
    ),
    "pipeline": ("TrainIterator", "epoch_permutation", "make_eval_batches", "make_train_iterator", "num_eval_batches"),
    "packing": ("Packing", "fill_ratio", "is_packed", "pack_batch", "real_tokens"),
    "tfds_builder": (
        "RpoPreferences",
        "build_tfds",
        "load_tfds_records",
        "records_from_data_source",
        "tfds_data_source",
    ),
    "demo": ("DEMO_DIR", "demo_paths", "judge"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f"rpo_jax.data.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rpo_jax.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
