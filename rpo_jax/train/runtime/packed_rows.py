"""`config.data.packing` / `config.data.share_prompt` in the trainer: the run's `Packing` (row length, rows a
multiple of the batch shards each process feeds, "auto"'s minimum saving) and packing of a process's own rows
(response ids made global by the process's offset; "auto"'s decision taken by all processes together). The
packer itself is `rpo_jax.data.packing`; the packed step is `rpo_jax.train.step.logprobs.packed_response_logps`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from rpo_jax.data import TokenizedDataset
from rpo_jax.data.packing import Packing, is_packed, pack_batch, packing_saves
from rpo_jax.models.logprobs import head_share, unembeds_scored_slots
from rpo_jax.train.config.validation import validate
from rpo_jax.train.config.values import parse_packing
from rpo_jax.train.runtime.global_batches import process_rows
from rpo_jax.train.runtime.performance import attention_key_cost

log = logging.getLogger(__name__)

AUTO_MIN_SAVING = 0.05
"""`packing="auto"` packs a batch when a step on its rows costs at most 95 % of one on the padded batch
(`rpo_jax.data.packing.batch_cost`: slots, attention over each row, and the output head's positions — the scored
slots of packed rows, the score window of each padded sequence). The 5 % margin stands for what the cost leaves
out: the packed step's sort and gathers of the scored slots, and a compilation for each new row shape."""


def packing_setting(value, field: str) -> bool | str:
    """A `config.data.packing` / `share_prompt` value → True, False or "auto" (command-line strings included;
    the schema's parser, `rpo_jax.train.config.values.parse_packing`)."""
    try:
        return parse_packing(value)
    except ValueError as e:
        raise ValueError(f"config.data.{field}={value!r}: {e}") from None


def packing_of(
    cfg: ml_collections.ConfigDict,
    mesh: Mesh,
    *,
    row_length: int,
    model_config=None,
    num_references: int = 0,
    score_window: int | None = None,
) -> Packing | None:
    """The run's `Packing` (None: padded batches).

    `config.data.packing`: True packs every batch; "auto" (the default) packs a batch when that saves at least
    `AUTO_MIN_SAVING` of its cost, except on a CPU mesh of several devices, where it is off (logged: XLA:CPU's
    in-process collective-permute in the packed step was seen to deadlock there); False: never. `share_prompt`
    True or "auto" shares prompts in packed rows ("auto" turns it off for a reference with its own tokenizer:
    `packing_with_references`). Rows are sized per batch (`rpo_jax.data.packing.choose_layout`), at most
    `row_length` (`Packing.max_row_length`) — the mode's longest sequence (preference: data.max_length; online:
    prompt width + new tokens) — or the batch's padded length, unless `config.data.pack_length` > 0 fixes them
    (to at least `row_length`);
    `model_config` (a `ModelConfig`; None: slots alone) and the `num_references` scored in the step give the costs
    `rpo_jax.data.packing.batch_cost` weighs in "auto"'s comparison: `performance.attention_key_cost` (longer rows'
    attention) and, where the packed step unembeds only the scored slots (`unembeds_scored_slots`; not on a
    context mesh, where both layouts run the head on every position), `head_share` with `score_window`
    (the padded batches' head positions per sequence, None: every position).
    The settings are checked by the schema (`validate`: a value that is not a setting, `share_prompt=True`
    without packing, a `pack_length` below the mode's longest sequence).
    """
    data = validate(cfg).data
    mode, share, length = data.packing, data.share_prompt, data.pack_length
    if not mode:
        return None
    devices = math.prod(mesh.shape.values())
    if mode == "auto" and devices > 1 and jax.devices()[0].platform == "cpu":
        log.info(
            "config.data.packing='auto': padded batches, because XLA:CPU's in-process collective-permute in "
            "the packed step was seen to deadlock on %d CPU devices (set packing=True to pack anyway)",
            devices,
        )
        return None
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    scored_head = model_config is not None and unembeds_scored_slots(model_config) and mesh.shape.get("context", 1) == 1
    return Packing(
        row_length=length,
        share_prompt=bool(share),
        max_row_length=row_length,
        row_multiple=max(1, shards // process_rows(mesh).count),
        min_saving=AUTO_MIN_SAVING if mode == "auto" else 0.0,
        key_cost=0.0 if model_config is None else attention_key_cost(model_config, num_references=num_references),
        head_cost=head_share(model_config) if scored_head else 0.0,
        score_window=score_window or 0,
    )


def packing_summary(packing: Packing) -> str:
    """One line for the run's log: the row length, shared prompts, when a batch is packed, and where the packed
    step runs the output head."""
    rows = (
        f"{packing.row_length} slots"
        if packing.row_length
        else f"a length chosen per batch (at most {packing.max_row_length} slots or the batch's padded length)"
    )
    when = (
        f"batches packed when that saves ≥ {packing.min_saving:.0%} of their cost (slots, attention and the output "
        "head's positions)"
        if packing.min_saving
        else "every batch packed"
    )
    head = "the scored slots" if packing.head_cost else "every slot"
    return f"rows of {rows}, share_prompt={packing.share_prompt}, {when}; the output head on {head} of packed rows"


def pack_local(
    batch: Mapping[str, np.ndarray], packing: Packing | None, mesh: Mesh, *, micro_batches: int = 1
) -> dict[str, np.ndarray]:
    """This process's rows of a contract batch packed (response ids global: its first example's global index is
    `first_local_example`; rows laid out for a step taking `micro_batches` micro-batches), or the batch as it is
    when `packing` is None or it is already packed. With `packing.min_saving` the batch stays padded unless
    packing saves that fraction on every process (one all-gather of the decision with several processes, so that
    all build the same layout)."""
    if packing is None or is_packed(batch):
        return dict(batch)
    b = np.asarray(batch["valid"]).shape[0]
    packed = pack_batch(
        batch,
        dataclasses.replace(packing, min_saving=0.0),
        first_example=first_local_example(b, mesh),
        micro_batches=micro_batches,
    )
    if not packing.min_saving:
        return packed
    saves = packing_saves(packed, batch, packing)
    if jax.process_count() > 1:
        saves = bool(np.all(multihost_utils.process_allgather(np.asarray(saves))))
    return packed if saves else dict(batch)


def first_local_example(local_batch: int, mesh: Mesh) -> int:
    """The global index of this process's first example when every process feeds `local_batch` rows of a batch
    sharded on the batch axes (`to_global`): its row group's first row (`process_rows`; processes of one group
    pack the same rows with the same ids)."""
    return process_rows(mesh).index * local_batch


def packing_with_references(
    packing: Packing | None,
    cfg: ml_collections.ConfigDict,
    references: Sequence,
    datasets: Mapping[str, TokenizedDataset],
) -> Packing | None:
    """`packing` for the run's `references` (`Reference`s; `datasets`: the policy's split → data): a reference with
    its own tokenizer scores its own tokenization of the records, with other prompt tokens, while references are
    scored in the policy's packed layout — so with such a reference `share_prompt="auto"` is turned off (logged)
    and `share_prompt=True` is a ValueError. Packing alone works with it."""
    if packing is None or not packing.share_prompt:
        return packing
    own = [r for r in references if r.datasets is not datasets]
    if not own:
        return packing
    if packing_setting(cfg.data.share_prompt, "share_prompt") == "auto":
        log.info(
            "config.data.share_prompt='auto': off, because reference %r has its own tokenizer (%s)",
            own[0].name,
            own[0].tokenizer_name,
        )
        return dataclasses.replace(packing, share_prompt=False)
    raise ValueError(
        f"config.data.share_prompt=True with reference {own[0].name!r}, which has its own tokenizer "
        f"({own[0].tokenizer_name}): it scores its own tokenization, not the policy's shared-prompt "
        "layout; use share_prompt='auto' or False (packing alone works with it) or the policy's "
        "tokenizer"
    )
