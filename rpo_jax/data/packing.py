"""Packing a contract batch's sequences into rows of T slots, optionally with one shared prompt per
example: fewer padding slots and, with ``share_prompt``, one encoding of the prompt for its K responses.

Input: the contract batch of :func:`~rpo_jax.data.tokenize.collate_examples` (tokens / attention_mask /
loss_mask ``[B,K,T_pad]``, valid / lengths ``[B,K]``, rewards, index, ref_logps ...). :func:`pack_batch` is a
pure function of it (so an iterator that packs restores exactly as one that does not) and returns a packed
batch: the row arrays ``[R, T]`` below plus every example-level array of the input unchanged (``valid``,
``lengths``, ``rewards``, ``index``, ``ref_logps``: the losses see exactly the padded batch's
``PreferenceLogps``) and ``sequence_lengths [B, K]`` int32 (``prompt + response`` tokens of each valid response,
for token counts that do not depend on the layout).

Row arrays (``[R, T]``; R is a multiple of ``row_multiple``, T = ``row_length``):

* ``tokens`` int32, ``attention_mask`` bool (True on real tokens, False on row padding);
* ``positions`` int32: the token's position in its own sequence (``prompt + response``); with a shared prompt
  a response's positions continue from the prompt's end (P, P+1, ...) for every response;
* ``segment_ids`` int32 (1, 2, ... within a row; 0 on padding); ``parent_ids`` int32 (only with
  ``share_prompt``): the segment id of the prompt a response continues, a token's own segment id otherwise.
  Key k is visible to query q iff k ≤ q ∧ k is real ∧ (seg[k] = seg[q] ∨ seg[k] = parent[q]);
* ``source`` int32: the slot whose hidden state predicts this slot's token — the previous token of the same
  sequence (the slot before, or the prompt's last slot for a response's first token when the prompt is
  shared); 0 where nothing is scored;
* ``response_id`` int32: ``1 + g·K + k`` on the slots scored for response k of example b (exactly the padded
  batch's ``loss_mask[b, k, t]`` for t ≥ 1), 0 elsewhere, where g = ``first_example + b`` is the example's
  index in the global batch (process p packs its own rows with ``first_example`` = p·B, B its batch share).
  The step sums per-token log-probs by this id: ``policy[g, k] = Σ_{slots with id 1+g·K+k} log p``.

Micro-batches. With ``micro_batches`` = M the global batch's examples g ≡ m (mod M) form micro-batch m (the
step's ``split_micro_batches`` takes rows m, m+M, ... of every array): each is packed into its own R_m rows, the
same R_m and T for all, row r of micro-batch m at row ``r·M + m``, and its ids count its own examples,
``1 + (g // M)·K + k`` — so a step that splits the packed batch into M slices gives each slice its own
examples' rows and ids. M = 1 is the layout above.

Layout. Each example becomes one or more *units*: without sharing, its K sequences (``prompt + response_k``),
as many as fit in T together in k order, the rest in further units; with sharing, its prompt followed by as
many responses as fit, further units repeating the prompt. Units are placed first-fit decreasing (longest
first, ties by example then unit) into rows, so an example's K responses share one row whenever they fit in
one, and no segment crosses a row. R = the rows used, rounded up to the next value of
``row_multiple · {1, 2, 3, 4, 6, 8, 12, ...}`` (powers of two and their 1.5×: at most a few compiled shapes),
or to ``row_multiple · ⌈B_m·K / row_multiple⌉`` (the padded sequence count, B_m = ⌈B / M⌉ examples per
micro-batch) when that is smaller.

Row shape. A fixed ``row_length`` gives T. With ``row_length = 0`` T is chosen per batch among the batch's own
padded length T_pad, the values of ``128 · {1, 2, 3, 4, 6, 8, 12, ...}`` from its longest sequence up to
T_max = max(T_pad, ``max_row_length``), and T_max (rows longer than the batch's sequences hold more of its
examples whole, e.g. a pair of 500-token sequences sharing a 200-token prompt in one row of 1,024 rather than
two of 512): the T whose layout costs least, ``R·T·(1 + key_cost·T)`` — slots, each attending to T keys (ties:
the shorter rows).
Since T = T_pad is a candidate and R ≤ B·K there (M = 1), the chosen rows never cost more than the padded
batch's B·K rows of T_pad. Memory: with ``max_slots`` > 0 a row length whose rows take more than that many slots
(R·T per micro-batch: a step's activations and logits grow with its slots) is passed over while another fits
(the cheapest of those that fit; if none does, the one of fewest slots), and among layouts of equal cost the one
of fewer slots is taken.

Shapes. Every [R, T] a packer returns is one of :func:`shape_ladder`'s for the run (its batch size, K, length
buckets and settings): at most (row lengths) × (row counts) shapes, a compiled step each, whatever the data.
``min_saving`` > 0 makes :func:`pack_batch` keep a batch padded unless packing saves at least that fraction of
the cost of its B·K rows of T_pad (:func:`batch_cost`: slots, attention and the output head's positions — the
packed step's head runs on the scored slots, the padded one's on a score window of each sequence).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

ROW_KEYS = ("tokens", "attention_mask", "positions", "segment_ids", "source", "response_id")


@dataclasses.dataclass(frozen=True)
class Packing:
    """How :func:`pack_batch` lays out a batch.

    Attributes:
      row_length: T, slots per row (at least the longest ``prompt + response``); 0: chosen per batch (module
        docstring, "Row shape"), at most the larger of the batch's own padded length and ``max_row_length``.
      max_row_length: with ``row_length`` 0, the longest rows a batch may take beyond its own padded length (the
        trainer: the mode's longest sequence, e.g. ``data.max_length``); 0: the batch's padded length.
      share_prompt: one copy of an example's prompt before its responses (``parent_ids``).
      row_multiple: R is a multiple of this (the batch shards one process feeds: data × fsdp / processes).
      min_saving: keep a batch padded (return it unchanged) unless its packed rows save at least this fraction of
        the padded batch's cost (:func:`layout_cost`); 0: always pack.
      key_cost: c, the cost of one attention key relative to the rest of a slot's work, so that a row of T slots
        costs T·(1 + c·T) when the row length is chosen (dense attention over the row; 0: slots only). The
        trainer sets it from the model's FLOPs (`rpo_jax.train.runtime.performance.attention_key_cost`).
      max_slots: the most slots (R·T) of one micro-batch's rows when the row length is chosen (module docstring,
        "Row shape"): a memory limit; 0: none. (The trainer does not set it yet: its fit check bounds memory.)
      head_cost: h, the cost of the output head at one position relative to a slot's at no keys; it weighs the
        head's positions in ``min_saving``'s comparison (:func:`batch_cost`): the packed step runs the head on the
        scored slots, a padded batch on ``score_window`` positions per sequence. 0: slots only. (The trainer sets
        it from the model's FLOPs, `rpo_jax.models.logprobs.head_share`, where its packed step unembeds
        the scored slots alone, `rpo_jax.models.logprobs.unembeds_scored_slots`, and to 0 elsewhere.)
      score_window: the padded batches' head positions per sequence (`config.model.score_window` resolved);
        0: every position after the first.
    """

    row_length: int
    share_prompt: bool = False
    max_row_length: int = 0
    row_multiple: int = 1
    min_saving: float = 0.0
    key_cost: float = 0.0
    max_slots: int = 0
    head_cost: float = 0.0
    score_window: int = 0

    def __post_init__(self):
        if self.row_length != 0 and self.row_length < 2:
            raise ValueError(f"packing row_length must be 0 (the batch's length) or >= 2, got {self.row_length}")
        if self.max_row_length < 0:
            raise ValueError(f"packing max_row_length must be >= 0 (0: the batch's length), got {self.max_row_length}")
        if self.row_multiple < 1:
            raise ValueError(f"packing row_multiple must be >= 1, got {self.row_multiple}")
        if not 0.0 <= self.min_saving < 1.0:
            raise ValueError(f"packing min_saving must be in [0, 1), got {self.min_saving}")
        if self.key_cost < 0.0:
            raise ValueError(f"packing key_cost must be >= 0, got {self.key_cost}")
        if self.max_slots < 0:
            raise ValueError(f"packing max_slots must be >= 0 (0: no limit), got {self.max_slots}")
        if self.head_cost < 0.0:
            raise ValueError(f"packing head_cost must be >= 0, got {self.head_cost}")
        if self.score_window < 0:
            raise ValueError(f"packing score_window must be >= 0 (0: every position), got {self.score_window}")


@dataclasses.dataclass(frozen=True)
class Piece:
    """One response of a unit: response ``k`` of the example, its sequence ``tokens [n]`` and the scored token
    positions ``scored [n] bool`` (``loss_mask`` with position 0 off)."""

    k: int
    tokens: np.ndarray
    scored: np.ndarray


@dataclasses.dataclass(frozen=True)
class PackUnit:
    """What goes into a row together: example ``b``'s ``pieces``; ``prompt`` tokens shared by them (None:
    each piece holds its whole sequence)."""

    b: int
    prompt: np.ndarray | None
    pieces: tuple[Piece, ...]

    @property
    def length(self) -> int:
        """Slots the unit takes."""
        shared = 0 if self.prompt is None else len(self.prompt)
        return shared + sum(len(p.tokens) - shared for p in self.pieces)


def example_pieces(batch: Mapping[str, np.ndarray], b: int) -> list[Piece]:
    """The valid responses of example ``b`` as whole sequences (``prompt + response``), in k order."""
    lengths = np.asarray(batch["attention_mask"][b]).sum(-1)
    pieces = []
    for k in np.flatnonzero(np.asarray(batch["valid"][b])):
        n = int(lengths[k])
        scored = np.asarray(batch["loss_mask"][b, k, :n], bool).copy()
        scored[:1] = False  # token 0 is never scored (no logits predict it)
        pieces.append(Piece(int(k), np.asarray(batch["tokens"][b, k, :n], np.int32), scored))
    return pieces


def shared_prompt_length(pieces: Sequence[Piece], where: str) -> int:
    """P: the tokens before the first scored token, the same tokens in every piece (0: nothing to share).

    Raises ValueError naming ``where`` when the pieces' prompts differ (e.g. another tokenization per response).
    """
    firsts = {int(np.argmax(p.scored)) if p.scored.any() else len(p.tokens) for p in pieces}
    if len(firsts) != 1:
        raise ValueError(
            f"{where}: data.share_prompt needs one prompt per example, but its responses start "
            f"scoring at different tokens {sorted(firsts)}"
        )
    (prompt_length,) = firsts
    first = pieces[0].tokens[:prompt_length]
    for p in pieces[1:]:
        if not np.array_equal(p.tokens[:prompt_length], first):
            raise ValueError(
                f"{where}: data.share_prompt needs one prompt per example, but response {p.k}'s "
                f"first {prompt_length} tokens differ from response {pieces[0].k}'s"
            )
    return prompt_length


def example_units(pieces: Sequence[Piece], b: int, packing: Packing, where: str) -> list[PackUnit]:
    """Example ``b``'s units: as many pieces per unit as fit in ``row_length`` (k order)."""
    prompt = None
    if packing.share_prompt and len(pieces) > 1:
        prompt_length = shared_prompt_length(pieces, where)
        prompt = pieces[0].tokens[:prompt_length] if prompt_length else None
    for p in pieces:
        if len(p.tokens) > packing.row_length:
            raise ValueError(
                f"{where}: response {p.k} has {len(p.tokens)} tokens (prompt + response), more than "
                f"the packing row length {packing.row_length}"
            )
    units, current = [], []
    for p in pieces:
        candidate = PackUnit(b, prompt, tuple(current + [p]))
        if current and candidate.length > packing.row_length:
            units.append(PackUnit(b, prompt, tuple(current)))
            current = [p]
        else:
            current.append(p)
    if current:
        units.append(PackUnit(b, prompt, tuple(current)))
    return units


def assign_rows(lengths: Sequence[int], row_length: int) -> list[list[int]]:
    """First-fit decreasing: the unit indices in each row, in placement order (units sorted by length,
    longest first, ties by index; each goes into the first row with room)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(row_length - lengths[i])
    return rows


def ladder_value(used: int, multiple: int) -> int:
    """The smallest ``multiple · m`` with m in {1, 2, 3, 4, 6, 8, 12, 16, ...} holding ``used``."""
    m = 1
    while multiple * m < used:
        power_of_two = m & (m - 1) == 0
        m = 2 if m == 1 else m * 3 // 2 if power_of_two else m * 4 // 3  # 1, 2, 3, 4, 6, 8, 12, 16, ...
    return multiple * m


def padded_row_count(used: int, multiple: int, cap: int | None = None) -> int:
    """R for ``used`` rows: ``ladder_value(used, multiple)``, or ``cap`` (a multiple of ``multiple`` ≥ used)
    when that is smaller."""
    rows = ladder_value(used, multiple)
    return rows if cap is None or cap < used else min(rows, cap)


ROW_LENGTH_STEP = 128  # automatic row lengths are ROW_LENGTH_STEP · {1, 2, 3, 4, 6, 8, 12, ...} (or T_pad)


def candidate_row_lengths(longest: int, padded_length: int, max_row_length: int = 0) -> list[int]:
    """Row lengths tried when ``Packing.row_length`` is 0, ascending: ``128·m`` (m on the ladder) in [longest,
    T_max) with T_max = max(T_pad, ``max_row_length``), T_pad itself and T_max."""
    longest_row = max(padded_length, max_row_length)
    out, value = {padded_length, longest_row}, ROW_LENGTH_STEP
    while value < longest_row:
        if value >= longest:
            out.add(value)
        value = ladder_value(value + 1, ROW_LENGTH_STEP)
    return sorted(out)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Units and their rows at row length T, per micro-batch: ``groups[m] = (units, placement)``, ``placement[r]``
    the indices into ``units`` of the micro-batch's row r; R rows each."""

    row_length: int
    rows: int
    groups: list[tuple[list[PackUnit], list[list[int]]]]


Examples = Sequence[tuple[int, list[Piece], str]]  # (b, pieces, where) of one micro-batch's examples


def layout_at(groups: Sequence[Examples], packing: Packing, row_length: int, row_cap: int) -> Layout:
    """Each micro-batch's examples in rows of ``row_length``; R: the most rows any needs, on the ladder."""
    packing = dataclasses.replace(packing, row_length=row_length)
    placed = []
    for examples in groups:
        units = [u for b, pieces, where in examples for u in example_units(pieces, b, packing, where)]
        placed.append((units, assign_rows([u.length for u in units], row_length)))
    used = max([len(placement) for _, placement in placed] + [1])
    return Layout(row_length, padded_row_count(used, packing.row_multiple, row_cap), placed)


def choose_layout(groups: Sequence[Examples], packing: Packing, padded_length: int, row_cap: int) -> Layout:
    """The fixed ``row_length``'s layout, or with ``row_length = 0`` the cheapest one over
    :func:`candidate_row_lengths`: least ``R·T·(1 + key_cost·T)`` (ties: fewer slots, then the shorter rows) among
    those within ``max_slots`` (all of them without a limit; the one of fewest slots when none fits)."""
    if packing.row_length:
        return layout_at(groups, packing, packing.row_length, row_cap)
    longest = max((len(p.tokens) for examples in groups for _, pieces, _ in examples for p in pieces), default=0)
    lengths = candidate_row_lengths(longest, padded_length, packing.max_row_length)
    layouts = [layout_at(groups, packing, t, row_cap) for t in lengths]
    if packing.max_slots:
        fitting = [lay for lay in layouts if lay.rows * lay.row_length <= packing.max_slots]
        layouts = fitting or [min(layouts, key=lambda lay: (lay.rows * lay.row_length, lay.row_length))]
    return min(
        layouts,
        key=lambda lay: (
            layout_cost((lay.rows, lay.row_length), packing.key_cost),
            lay.rows * lay.row_length,
            lay.row_length,
        ),
    )


def row_counts(multiple: int, cap: int) -> list[int]:
    """Every R :func:`padded_row_count` gives with this ``multiple`` and ``cap``: the ladder's values below the cap,
    and the cap."""
    out, used = [], 1
    while (rows := padded_row_count(used, multiple, cap)) < cap:
        out.append(rows)
        used = rows + 1
    return out + [cap]


def shape_ladder(
    batch_size: int, k_max: int, buckets: Sequence[int], packing: Packing, *, micro_batches: int = 1
) -> list[tuple[int, int]]:
    """Every ``tokens`` shape [R, T] that :func:`pack_batch` can give a batch of ``batch_size`` examples of at most
    ``k_max`` responses padded to one of ``buckets`` (the data's length buckets), laid out for ``micro_batches``:
    T a fixed ``row_length`` or any :func:`candidate_row_lengths` of a bucket, R = M·R_m with R_m one of
    :func:`row_counts` up to the micro-batch's padded sequence count. Sorted; its length bounds the packed
    programs a run compiles."""
    per_group = -(-batch_size // micro_batches) * k_max
    cap = -(-per_group // packing.row_multiple) * packing.row_multiple
    if packing.row_length:
        lengths = {packing.row_length}
    else:
        lengths = {t for b in buckets for t in candidate_row_lengths(0, max(int(b), 2), packing.max_row_length)}
    return sorted((micro_batches * r, t) for t in lengths for r in row_counts(packing.row_multiple, cap))


def layout_cost(shape: Sequence[int], key_cost: float) -> float:
    """The cost of computing a ``tokens`` array of ``shape`` (``[R, T]`` rows or ``[B, K, T]`` padded sequences):
    slots × (1 + key_cost · T), every slot attending to the T keys of its row."""
    return float(np.prod(shape)) * (1.0 + key_cost * shape[-1])


def write_unit(
    rows: dict[str, np.ndarray], r: int, start: int, unit: PackUnit, first_segment: int, first_id: int
) -> tuple[int, int]:
    """Write ``unit`` into row ``r`` from slot ``start`` (segments numbered from ``first_segment``, response k
    scored with id ``first_id + k``); returns the next free slot and the next segment id."""
    slot, segment = start, first_segment

    def put(tokens, positions, seg, parent, source, ids):
        nonlocal slot
        n = len(tokens)
        span = slice(slot, slot + n)
        rows["tokens"][r, span], rows["positions"][r, span] = tokens, positions
        rows["attention_mask"][r, span] = True
        rows["segment_ids"][r, span], rows["parent_ids"][r, span] = seg, parent
        rows["source"][r, span], rows["response_id"][r, span] = source, ids
        slot += n

    prompt_length = 0 if unit.prompt is None else len(unit.prompt)
    prompt_segment, prompt_end = segment, slot + prompt_length - 1
    if unit.prompt is not None:
        put(unit.prompt, np.arange(prompt_length), segment, segment, 0, 0)
        segment += 1
    for p in unit.pieces:
        tokens, scored = p.tokens[prompt_length:], p.scored[prompt_length:]
        n = len(tokens)
        if n == 0:
            continue
        previous = slot + np.arange(n) - 1
        if unit.prompt is not None:
            previous[0] = prompt_end
        parent = prompt_segment if unit.prompt is not None else segment
        put(
            tokens,
            prompt_length + np.arange(n),
            segment,
            parent,
            np.where(scored, previous, 0),
            np.where(scored, first_id + p.k, 0),
        )
        segment += 1
    return slot, segment


def pack_batch(
    batch: Mapping[str, np.ndarray], packing: Packing, *, first_example: int = 0, micro_batches: int = 1
) -> dict[str, np.ndarray]:
    """The packed batch of a contract batch (module docstring).

    Args:
        batch: a contract batch `[B, K, T]`.
        packing: the row length, shared prompts and the minimum saving.
        first_example: the global index of the batch's first example (its process's offset).
        micro_batches: M, rows laid out for a step that splits the batch into M micro-batches.

    Returns:
        Row arrays `[R, T]` and the example-level arrays of `batch` (everything but tokens / attention_mask /
        loss_mask) unchanged; with `packing.min_saving` > 0, `batch` itself (a copy of the dict, not packed)
        when packing would not save that fraction of its cost (`packing_saves`).

    Raises:
        ValueError: naming the example (batch row and record index) when a sequence is longer than the row
            length, or, with `share_prompt`, when an example's responses do not share their prompt tokens.
    """
    if micro_batches < 1:
        raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
    b_count, k_max = np.asarray(batch["valid"]).shape
    index = np.asarray(batch.get("index", np.arange(b_count)))
    padded_length = max(int(np.shape(batch["tokens"])[-1]), 2)
    groups: list[list] = [[] for _ in range(micro_batches)]
    for b in range(b_count):
        if pieces := example_pieces(batch, b):
            groups[(first_example + b) % micro_batches].append(
                (b, pieces, f"batch example {b} (record {int(index[b])})")
            )
    per_group = -(-b_count // micro_batches) * k_max
    row_cap = -(-per_group // packing.row_multiple) * packing.row_multiple
    layout = choose_layout(groups, packing, padded_length, row_cap)
    shape = (micro_batches * layout.rows, layout.row_length)
    rows = {key: np.zeros(shape, bool if key == "attention_mask" else np.int32) for key in ROW_KEYS}
    rows["parent_ids"] = np.zeros(shape, np.int32)
    for m, (units, placement) in enumerate(layout.groups):
        for r, members in enumerate(placement):
            slot, segment = 0, 1
            for i in members:
                first_id = 1 + (first_example + units[i].b) // micro_batches * k_max
                slot, segment = write_unit(rows, r * micro_batches + m, slot, units[i], segment, first_id)
    if not packing.share_prompt:
        del rows["parent_ids"]
    rest = {key: np.asarray(v) for key, v in batch.items() if key not in ("tokens", "attention_mask", "loss_mask")}
    sequence_lengths = (np.asarray(batch["attention_mask"]).sum(-1) * np.asarray(batch["valid"])).astype(np.int32)
    packed = {**rows, **rest, "sequence_lengths": sequence_lengths}
    return packed if not packing.min_saving or packing_saves(packed, batch, packing) else dict(batch)


def batch_cost(batch: Mapping[str, np.ndarray], packing: Packing) -> float:
    """The cost of a step on ``batch``: its :func:`layout_cost` (``packing.key_cost``) plus ``packing.head_cost`` ×
    the positions the output head runs on — a packed batch's scored slots (:func:`scored_tokens`; the step
    rounds them up to a chunk per device), a padded batch's ``score_window`` positions of each of its B·K
    sequences (every position after the first when 0 or longer)."""
    shape = np.shape(batch["tokens"])
    if is_packed(batch):
        head = scored_tokens(batch)
    else:
        per_sequence = shape[-1] - 1
        head = math.prod(shape[:-1]) * (min(packing.score_window, per_sequence) or per_sequence)
    return layout_cost(shape, packing.key_cost) + packing.head_cost * head


def packing_saves(packed: Mapping[str, np.ndarray], batch: Mapping[str, np.ndarray], packing: Packing) -> bool:
    """True when a step on ``packed`` costs at most ``(1 − packing.min_saving)`` of one on the contract ``batch``
    (:func:`batch_cost`: the rows' slots and attention, and the output head's positions)."""
    return batch_cost(packed, packing) <= (1.0 - packing.min_saving) * batch_cost(batch, packing)


def is_packed(batch: Mapping[str, object]) -> bool:
    """Whether a batch is packed.

    Args:
        batch: a batch.

    Returns:
        True for a batch from `pack_batch` (it has `response_id`).
    """
    return "response_id" in batch


def fill_ratio(packed: Mapping[str, np.ndarray]) -> float:
    """How full a batch is.

    Args:
        packed: a packed batch, or a contract batch.

    Returns:
        Real tokens ÷ row slots (a contract batch: real tokens ÷ `B·K·T` slots).
    """
    mask = np.asarray(packed["attention_mask"])
    return float(mask.sum() / max(mask.size, 1))


def real_tokens(batch: Mapping[str, np.ndarray]) -> int:
    """The tokens a batch trains on, the same count whichever layout computes it.

    Args:
        batch: a contract or packed batch.

    Returns:
        Σ over valid responses of `prompt + response` tokens (for a packed batch its `sequence_lengths`: a
        shared prompt counted once per response).
    """
    if is_packed(batch):
        return int(np.sum(batch["sequence_lengths"]))
    valid = np.asarray(batch["valid"])[..., None]
    return int(np.sum(np.asarray(batch["attention_mask"]) & valid))


def scored_tokens(batch: Mapping[str, np.ndarray]) -> int:
    """The tokens a batch's losses score, the same count whichever layout holds them.

    Args:
        batch: a contract or packed batch.

    Returns:
        Σ over valid responses of their scored tokens (`loss_mask` after position 0; for a packed batch the
        slots with a `response_id`).
    """
    if is_packed(batch):
        return int(np.sum(np.asarray(batch["response_id"]) > 0))
    scored = np.asarray(batch["loss_mask"])[..., 1:].astype(bool) & np.asarray(batch["valid"])[..., None]
    return int(np.sum(scored))
