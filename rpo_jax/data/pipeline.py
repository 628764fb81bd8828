"""Grain pipelines over a :class:`~rpo_jax.data.tokenize.TokenizedDataset`: resumable training, complete eval.

Training order. With N examples, P processes and per-process batch B, one epoch has
``S = N // (P * B)`` steps (the remainder, fewer than P·B examples, differs every epoch and is not used that
epoch). Epoch ``e`` visits ``perm_e = default_rng([seed, e]).permutation(N)`` (``arange(N)`` when
``shuffle=False``); global step ``g = e * S + s`` gives process ``p`` the examples
``perm_e[(s * P + p) * B : (s * P + p + 1) * B]``. So every process sees the same number of batches,
the processes' examples are disjoint, and the order depends only on (seed, epoch).

The iterator is a grain ``MapDataset`` (one item per global step) turned into an ``IterDataset`` iterator;
its state is the next global step, saved as JSON-able data together with the layout it is valid for.

Packing (``packing=`` a :class:`~rpo_jax.data.packing.Packing`): each batch is packed by
:func:`~rpo_jax.data.packing.pack_batch`, a pure function of the batch, so the state and the resume are the same
as without it. Process ``p`` packs its own rows with response ids offset by ``p·B·K`` (global ids once the
processes' rows are concatenated).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

from rpo_jax.data.packing import Packing, pack_batch
from rpo_jax.data.tokenize import TokenizedDataset


def _process_defaults(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, process_count={process_count})")
    return process_index, process_count


def epoch_permutation(num_examples: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The order in which an epoch visits the examples.

    Args:
        num_examples: N.
        seed: the shuffle seed.
        epoch: the epoch.
        shuffle: False: `arange(N)`.

    Returns:
        `[N]` int64, `default_rng([seed, epoch]).permutation(N)`.
    """
    if not shuffle:
        return np.arange(num_examples)
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


@dataclasses.dataclass(frozen=True)
class _Layout:
    num_examples: int
    batch_size: int
    seed: int
    shuffle: bool
    process_index: int
    process_count: int
    num_epochs: int | None

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // (self.batch_size * self.process_count)

    def positions(self, step: int) -> np.ndarray:
        """``[B]``: positions (into the dataset's examples) of this process's batch at global ``step``."""
        epoch, s = divmod(step, self.steps_per_epoch)
        perm = _cached_permutation(self.num_examples, self.seed, epoch, self.shuffle)
        start = (s * self.process_count + self.process_index) * self.batch_size
        return perm[start : start + self.batch_size]


_PERM_CACHE: dict[tuple, np.ndarray] = {}


def _cached_permutation(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    key = (n, seed, epoch, shuffle)
    if key not in _PERM_CACHE:
        if len(_PERM_CACHE) > 4:
            _PERM_CACHE.clear()
        _PERM_CACHE[key] = epoch_permutation(n, seed, epoch, shuffle)
    return _PERM_CACHE[key]


class TrainIterator(Iterator[dict[str, np.ndarray]]):
    """Iterator over training batches with ``get_state()`` / ``set_state()`` (JSON-able).

    ``state = it.get_state()`` after n batches, then on a fresh iterator built with the same arguments,
    ``it2.set_state(state)`` makes ``next(it2)`` the (n+1)-th batch exactly.
    """

    def __init__(self, dataset: TokenizedDataset, layout: _Layout, packing: Packing | None = None):
        self._dataset = dataset
        self._layout = layout
        steps = grain.MapDataset.range(layout.steps_per_epoch).repeat(layout.num_epochs)
        first = layout.process_index * layout.batch_size  # the global index of this process's first example
        self._grain = steps.map_with_index(
            lambda step, _: packed_or_not(dataset.collate(layout.positions(step).tolist()), packing, first)
        )
        self._iter = iter(self._grain.to_iter_dataset(read_options=grain.ReadOptions(num_threads=0)))

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch (the same on every process)."""
        return self._layout.steps_per_epoch

    @property
    def step(self) -> int:
        """The global step of the next batch (0-based; counts from the first epoch)."""
        return int(self._iter.get_state()["next_index"])

    @property
    def epoch(self) -> int:
        """The epoch of the next batch."""
        return self.step // self.steps_per_epoch

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iter)

    def get_state(self) -> dict[str, Any]:
        """JSON-able state: the next step and the layout it belongs to."""
        return {"step": self.step, **dataclasses.asdict(self._layout)}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`get_state`); ValueError if it belongs to another layout."""
        mine = dataclasses.asdict(self._layout)
        theirs = {k: state.get(k) for k in mine}
        if theirs != mine:
            diff = {k: (theirs[k], mine[k]) for k in mine if theirs[k] != mine[k]}
            raise ValueError(f"iterator state belongs to another layout (saved, current): {diff}")
        self._iter.set_state({"next_index": int(state["step"])})


def packed_or_not(batch: dict[str, np.ndarray], packing: Packing | None, first_example: int) -> dict[str, np.ndarray]:
    """``batch`` packed by ``packing`` (its first example has global index ``first_example``), or as it is when
    ``packing`` is None."""
    return batch if packing is None else pack_batch(batch, packing, first_example=first_example)


def make_train_iterator(
    dataset: TokenizedDataset,
    batch_size: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    packing: Packing | None = None,
) -> TrainIterator:
    """A resumable iterator of training batches (contract batch, `[B, K, T]` with bucketed T).

    Args:
        dataset: from `tokenize_records`.
        batch_size: B, examples per batch on this process.
        seed: shuffle seed; epoch `e` uses `default_rng([seed, e])`.
        shuffle: False visits examples in order every epoch.
        num_epochs: `None` repeats forever.
        process_index: default `jax.process_index()`.
        process_count: default `jax.process_count()`.
        packing: yield packed batches (module docstring); `None`: contract batches `[B, K, T]`.

    Returns:
        A `TrainIterator` (`get_state()` / `set_state()` for checkpoints).

    Raises:
        ValueError: when the dataset has fewer than `batch_size * process_count` examples.
    """
    process_index, process_count = _process_defaults(process_index, process_count)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    layout = _Layout(
        num_examples=len(dataset),
        batch_size=batch_size,
        seed=seed,
        shuffle=shuffle,
        process_index=process_index,
        process_count=process_count,
        num_epochs=num_epochs,
    )
    if layout.steps_per_epoch < 1:
        raise ValueError(
            f"{len(dataset)} examples cannot fill one global batch of {batch_size} x {process_count} processes"
        )
    return TrainIterator(dataset, layout, packing)


def num_eval_batches(dataset: TokenizedDataset, batch_size: int, process_count: int = 1) -> int:
    """How many batches each process yields in `make_eval_batches`.

    Args:
        dataset: the tokenized split (N examples).
        batch_size: B.
        process_count: P.

    Returns:
        `ceil(N / (B * P))`.
    """
    return max(1, math.ceil(len(dataset) / (batch_size * process_count)))


def make_eval_batches(
    dataset: TokenizedDataset,
    batch_size: int,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    packing: Packing | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Every example exactly once, in order, over all processes; the tail is padded with all-invalid examples.

    Global batch `s` covers examples `[s * P * B, (s + 1) * P * B)`; process `p` gets its `p`-th block of B.
    Padding examples have `valid` all False and `index` -1.

    Args:
        dataset: from `tokenize_records`.
        batch_size: B, examples per batch on this process.
        process_index: default `jax.process_index()`.
        process_count: P, default `jax.process_count()`.
        packing: packed batches, as in `make_train_iterator`; `None`: contract batches.

    Yields:
        `num_eval_batches` batches on every process.
    """
    process_index, process_count = _process_defaults(process_index, process_count)
    n = len(dataset)
    for s in range(num_eval_batches(dataset, batch_size, process_count)):
        start = (s * process_count + process_index) * batch_size
        positions = [i if i < n else None for i in range(start, start + batch_size)]
        yield packed_or_not(dataset.collate(positions), packing, process_index * batch_size)
