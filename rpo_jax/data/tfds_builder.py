"""A tensorflow-datasets builder that stores preference records as array_record splits (no TensorFlow needed).

Each example has two features: ``record`` (``tfds.features.Text``): the canonical
:class:`~rpo_jax.data.records.PreferenceRecord` as JSON (``PreferenceRecord.to_json``: prompt and responses as
message lists, rewards or null, the conversational flag and the source file/line), and ``index``
(``int64``): the record's position in its split. Shuffling is disabled, so ``data_source[i]`` is record i.

Splits come either from given files per split (``splits={"train": [...], "test": [...]}``) or from one set of
sources with a held-out fraction: ``round(fraction * N)`` records chosen by ``default_rng(seed)`` go to the
held-out split (``"test"``), the rest to ``"train"``, each keeping source order.

Reading goes through ``tfds.data_source`` (``ArrayRecordDataSource``, random access, no TensorFlow).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from rpo_jax.data.records import OnError, PreferenceRecord, ReadReport, read_records
from rpo_jax.data.selection import holdout_split

BUILDER_NAME = "rpo_preferences"


@dataclasses.dataclass(eq=False)
class PreferenceConfig(tfds.core.BuilderConfig):
    """Where the splits come from (see the module docstring)."""

    splits: Mapping[str, Sequence[str]] | None = None
    sources: Sequence[str] | None = None
    holdout_fraction: float | None = None
    holdout_split: str = "test"
    train_split: str = "train"
    seed: int = 0
    format: str | None = None
    on_error: str = "raise"


class RpoPreferences(tfds.core.GeneratorBasedBuilder):
    """Preference records (canonical JSON text + index) in array_record splits."""

    VERSION = tfds.core.Version("1.0.0")
    # tfds finds a builder's folder through importlib resources, which fails for editable installs without
    # the `importlib_resources` backport; the builder's folder is simply this file's folder.
    code_path = epath.Path(__file__)
    RELEASE_NOTES = {"1.0.0": "Canonical preference records as JSON text."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Preference records (prompt, K responses, optional rewards) as canonical JSON.",
            features=tfds.features.FeaturesDict({"record": tfds.features.Text(), "index": np.int64}),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        self.read_reports: dict[str, ReadReport] = {}
        return {name: self._generate_examples(records) for name, records in self._split_records().items()}

    def _split_records(self) -> dict[str, list[PreferenceRecord]]:
        cfg: PreferenceConfig = self.builder_config
        if (cfg.splits is None) == (cfg.sources is None):
            raise ValueError("give exactly one of splits={name: files} or sources=files (+ holdout_fraction)")
        read = dict(format=cfg.format, on_error=cfg.on_error)
        if cfg.splits is not None:
            out = {}
            for name, files in cfg.splits.items():
                out[name], self.read_reports[name] = read_records(list(files), **read)
            return out
        records, self.read_reports["all"] = read_records(list(cfg.sources), **read)
        if cfg.holdout_fraction is None:
            return {cfg.train_split: records}
        return holdout_split(
            records, cfg.holdout_fraction, seed=cfg.seed, train_split=cfg.train_split, holdout_split=cfg.holdout_split
        )

    def _generate_examples(self, records: list[PreferenceRecord]) -> Iterable[tuple[int, dict[str, Any]]]:
        for i, r in enumerate(records):
            yield i, {"record": json.dumps(r.to_json(), ensure_ascii=False), "index": i}


def build_tfds(
    data_dir: str | os.PathLike,
    *,
    splits: Mapping[str, Sequence[str]] | None = None,
    sources: Sequence[str] | str | None = None,
    holdout_fraction: float | None = None,
    seed: int = 0,
    name: str = "default",
    format: str | None = None,
    on_error: OnError = "raise",
) -> tuple[str, dict[str, ReadReport]]:
    """Convert sources into array_record splits under ``data_dir/rpo_preferences/<name>/1.0.0``.

    Args:
      data_dir: TFDS data directory.
      splits: ``{split_name: [files or directories]}``, or
      sources: files/directories split into ``train`` and ``test`` by ``holdout_fraction`` with ``seed``
        (``holdout_fraction=None``: everything goes to ``train``).
      name: the builder config name (read back with the same name).
      format, on_error: as in :func:`~rpo_jax.data.records.read_records`.

    Returns:
      ``(builder_dir, read_reports)``; an existing prepared dataset is reused as is.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [str(sources)]
    config = PreferenceConfig(
        name=name,
        version=RpoPreferences.VERSION,
        splits=None if splits is None else {k: [str(f) for f in v] for k, v in splits.items()},
        sources=None if sources is None else [str(s) for s in sources],
        holdout_fraction=holdout_fraction,
        seed=seed,
        format=format,
        on_error=on_error,
    )
    builder = RpoPreferences(config=config, data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(verify_ssl=False))
    return str(builder.data_dir), getattr(builder, "read_reports", {})


def tfds_data_source(data_dir: str | os.PathLike, split: str, *, name: str = "default") -> Sequence[dict]:
    """The prepared split as a random-access `tfds` data source.

    Args:
        data_dir: the TFDS data directory.
        split: the split's name.
        name: the builder config's name.

    Returns:
        The data source (items `{"record": bytes, "index": int}`).
    """
    builder_dir = os.path.join(str(data_dir), BUILDER_NAME, name, str(RpoPreferences.VERSION))
    if not os.path.isdir(builder_dir):
        raise ValueError(f"{builder_dir}: no prepared dataset (run build_tfds first)")
    return tfds.data_source(f"{BUILDER_NAME}/{name}", split=split, data_dir=str(data_dir), download=False)


def records_from_data_source(source: Sequence[dict]) -> list[PreferenceRecord]:
    """Decode every item of a data source from `tfds_data_source` into records, in index order.

    Args:
        source: the data source.

    Returns:
        The records.
    """
    out = []
    for i in range(len(source)):
        item = source[i]
        text = item["record"]
        out.append(PreferenceRecord.from_json(json.loads(text.decode("utf-8") if isinstance(text, bytes) else text)))
        if int(item["index"]) != i:
            raise ValueError(f"data source item {i} has index {int(item['index'])} (the split was shuffled?)")
    return out


def load_tfds_records(data_dir: str | os.PathLike, split: str, *, name: str = "default") -> list[PreferenceRecord]:
    """The records of a prepared split, in their original order.

    Args:
        data_dir: the TFDS data directory.
        split: the split's name.
        name: the builder config's name.

    Returns:
        The records.
    """
    return records_from_data_source(tfds_data_source(data_dir, split, name=name))
