"""Orbax checkpoints of the train state (params, optimizer state, step, RNG) and the data iterator state.

Every `every_steps` and at the end, asynchronous, keep-last-k. Restoring walks the complete checkpoints
from the newest down: one that fails to restore (corrupt, partial) is skipped with a warning in favour of the
last one that restores. Orbax writes into a temporary directory and renames it when complete (on `gs://`, where
a rename is a copy, it writes a `commit_success.txt` marker last instead), so a run killed mid-save leaves no
half checkpoint under a step name. The directory is a local path or a URL: orbax and TensorStore write `gs://`
themselves.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import orbax.checkpoint as ocp

from rpo_jax.data import storage

log = logging.getLogger(__name__)


class Checkpointer:
    """A thin wrapper over `ocp.CheckpointManager` with items `params`, `state` (the rest of the train state:
    optimizer state, step, RNG, and the primary reference's parameters `reference` in runs where they move:
    `config.reference_sync`, iterated in-step training) and `data` (the data iterator's JSON state). `params`
    alone can be restored (export) without materialising the optimizer state or the reference."""

    def __init__(self, directory: storage.PathLike, *, every_steps: int, keep: int = 3, asynchronous: bool = True):
        self.directory = storage.location(directory)
        self.every_steps = max(1, int(every_steps))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=1,
            enable_async_checkpointing=asynchronous,
            create=True,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("params", "state", "data"))

    def all_steps(self) -> list[int]:
        """The steps of the complete checkpoints in the directory, oldest first."""
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest checkpoint's step, once any save in progress has finished (None when there is none)."""
        self.manager.wait_until_finished()
        return self.manager.latest_step()

    def should_save(self, step: int) -> bool:
        return step % self.every_steps == 0

    def save(self, step: int, state: Any, data_state: Any, *, force: bool = False) -> bool:
        """Start saving (asynchronously); returns whether a save was started."""
        if step in self.manager.all_steps():
            return False
        if not force and not self.should_save(step):
            return False
        rest = {k: v for k, v in state.items() if k != "params"}
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(state["params"]),
                state=ocp.args.StandardSave(rest),
                data=ocp.args.JsonSave(data_state),
            ),
            force=True,
        )

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, Any] | None:
        """(step, state, data_state) of the newest checkpoint that restores, or None when there is none.

        `abstract_state`: the train state as a pytree of `jax.ShapeDtypeStruct` with shardings (arrays come back
        in that sharding).
        """
        rest = {k: v for k, v in abstract_state.items() if k != "params"}
        restored = self._restore_newest(
            params=ocp.args.StandardRestore(abstract_state["params"]),
            state=ocp.args.StandardRestore(rest),
            data=ocp.args.JsonRestore(),
        )
        if restored is None:
            return None
        step, items = restored
        return step, {"params": items["params"], **items["state"]}, items["data"]

    def restore_params(self, abstract_params: Any) -> tuple[int, Any] | None:
        """(step, params) of the newest checkpoint whose parameters restore (no optimizer state is read)."""
        restored = self._restore_newest(params=ocp.args.StandardRestore(abstract_params))
        return None if restored is None else (restored[0], restored[1]["params"])

    def _restore_newest(self, **items) -> tuple[int, Any] | None:
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return step, self.manager.restore(step, args=ocp.args.Composite(**items))
            except Exception as e:  # noqa: BLE001 - any failure means this checkpoint is unusable
                log.warning(
                    "checkpoint %s/%d could not be restored (%s: %s); trying an older one",
                    self.directory,
                    step,
                    type(e).__name__,
                    e,
                )
        return None

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) for every array of `tree`, the target of a restore."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
