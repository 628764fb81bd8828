"""Preference training (`config.mode = "preference"`, the default job): records → policy and references →
the loss of `config.loss` on `[B, K]` log-probs, driven by the run skeleton (`rpo_jax.train.core.runner`).

What is specific to this mode: the references (a frozen copy of the initial policy and any `config.references`,
scored in the step or cached once as `[N, K, R]` under WORKDIR/ref_cache), the score window shared by train,
eval and the cache, iterated training (`config.train.iterations > 1`: the primary reference becomes the previous
iterate), references that move (`config.reference_sync`, TR-DPO), and evaluation over the whole held-out split.

Where the primary reference's parameters live: in the `Reference` (frozen for the run), or — with
`config.reference_sync.every > 0`, and with iterated training whose references are scored in the step — in the
train state as `state["reference"]` (`hold_reference_in_state`), so that checkpoints hold the reference of the moment
and a resume anywhere continues exactly.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rpo_jax.data import TokenizedDataset, storage
from rpo_jax.data.packing import Packing, is_packed, real_tokens, scored_tokens
from rpo_jax.train.build.data import (
    distinct_inputs,
    largest_batch,
    load_records,
    load_tokenizer,
    preference_direction,
    resolve_epochs,
    tokenize_splits,
    tokenizer_path,
    train_iterator,
)
from rpo_jax.train.build.fingerprints import dataset_fingerprint
from rpo_jax.train.build.fit import FIT_LOOKAHEAD_STEPS, check_programs_fit, fitting_run, local_devices, log_fit
from rpo_jax.train.build.loss_inputs import in_micro_batch_order, packing_for_loss, unpaired_datasets
from rpo_jax.train.build.model import load_policy, with_speed_settings
from rpo_jax.train.build.plans import device_bytes
from rpo_jax.train.build.programs import (
    ReferenceLayout,
    ReferenceSync,
    WithFrozen,
    jitted_steps,
    reference_layout,
    reference_sync_of,
    scorer,
    state_with_loss_state,
    state_with_reference,
)
from rpo_jax.train.build.references import INITIAL_POLICY, Reference, build_references, cached_logps, compute_logps
from rpo_jax.train.build.state import RunSetup, build_loss, build_setup, compute_dtype, lighter_setup, model_settings
from rpo_jax.train.config.validation import validate
from rpo_jax.train.config.values import PREFERENCE, memory_budget_bytes
from rpo_jax.train.core.identity import run_identity
from rpo_jax.train.core.runner import ResumeError, Task, Unit, run_task, sum_over_eval_batches
from rpo_jax.train.core.workdir import REFERENCE_CACHE
from rpo_jax.train.runtime.cpu_memory import HeapGuard, release_free_memory, reuse_applied
from rpo_jax.train.runtime.global_batches import config_mesh, local_batch_size, process_rows, to_global
from rpo_jax.train.runtime.packed_rows import pack_local, packing_of, packing_summary, packing_with_references
from rpo_jax.train.runtime.performance import batch_flops
from rpo_jax.train.step.logprobs import resolve_score_window
from rpo_jax.train.step.unpaired_steps import drop_empty_labels, label_means, label_sums

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PreferenceRun(RunSetup):
    """Everything preference training builds before the first step (also used by tests and benchmarks)."""

    workdir: storage.PathLike  # a local path or a URL (`rpo_jax.data.storage`)
    loss_fn: Any
    datasets: dict[str, TokenizedDataset]
    references: list[Reference]
    layout: ReferenceLayout  # where the references live and when they are scored (the one decision)
    score_window: int | None  # output-head positions per sequence (config.model.score_window)
    ref_cache: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # split → [N, K, R] (cache mode)
    preference_direction: dict[str, Any] = dataclasses.field(default_factory=dict)  # `preference_direction`
    packing: Packing | None = None  # config.data.packing / share_prompt (`packing_of`); None: padded batches

    @property
    def in_step_refs(self) -> bool:
        """References scored in the step (else their log-probs are cached)."""
        return self.layout.in_step

    @property
    def reference_sync(self) -> ReferenceSync | None:
        """Not None when the primary reference's parameters live in the train state ("reference", checkpointed;
        `hold_reference_in_state`) and move as it says (every = 0: reset per iteration only); references[0].params
        is then None."""
        return self.layout.sync if self.layout.in_state else None


def score_window_of(cfg: ml_collections.ConfigDict, datasets: Mapping[str, TokenizedDataset], mesh) -> int | None:
    """The run's static `score_window` (`config.model.score_window`) for `datasets` (one tokenization: every
    split, so train, eval and the reference cache share one W and one compilation per length bucket). None (every
    position) on a `mesh` with a context axis: each device runs the head on its own T/C positions there
    (`rpo_jax.models.logprobs.context_token_logps`; a numeric window is refused at validation)."""
    if mesh.shape.get("context", 1) > 1:
        return None
    span = max((ds.max_scored_span for ds in datasets.values()), default=0)
    return resolve_score_window(cfg.model.score_window, span)


def build_run(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike, *, devices=None) -> PreferenceRun:
    """Data, policy, references, optimizer and initial state (`devices`: a subset to run on; default all). `cfg`
    is validated first (`rpo_jax.train.config.validation.validate`); the run holds the typed config."""
    cfg = validate(cfg)
    mesh = config_mesh(cfg.mesh, devices)
    dtype = compute_dtype(cfg.model.dtype)
    loss_fn = build_loss(cfg)
    tokenizer = load_tokenizer(tokenizer_path(cfg))
    if loss_fn.spec.unpaired:  # kto, apo_zero_unpaired, bco: labelled completions (`build.loss_inputs`)
        datasets, direction = unpaired_datasets(cfg, tokenizer, loss_fn), {}
    else:
        records = load_records(cfg, requires_rewards=loss_fn.spec.requires_rewards)
        rewards_to_loss, direction = preference_direction(cfg, records, loss_fn.spec.requires_rewards)
        datasets = tokenize_splits(cfg, records, tokenizer)
        if not rewards_to_loss:  # labelled pairs train as labelled: their scores stay out of the batch
            datasets = {split: dataclasses.replace(ds, has_rewards=False) for split, ds in datasets.items()}
    cfg = resolve_epochs(cfg, len(datasets["train"]))
    model, model_config = load_policy(cfg, tokenizer, mesh, dtype)
    setup = build_setup(
        cfg,
        model,
        model_config,
        mesh=mesh,
        dtype=dtype,
        tokenizer=tokenizer,
        total_steps=cfg.train.steps * max(1, cfg.train.iterations),
    )
    setup.state, setup.state_shardings = state_with_loss_state(setup.state, setup.state_shardings, loss_fn, mesh)
    layout = reference_layout(cfg, loss_fn.spec.requires_reference, reference_sync_of(cfg))
    references = build_references(cfg, setup, datasets, loss_fn)
    score_window = None if loss_fn.spec.requires_sequence_logps else score_window_of(cfg, datasets, mesh)
    refs = len(references) if layout.in_step else 0
    packing = packing_of(
        cfg,
        mesh,
        row_length=cfg.data.max_length,
        model_config=model_config,
        num_references=refs,
        score_window=score_window,
    )
    packing = packing_for_loss(packing_with_references(packing, cfg, references, datasets), loss_fn.spec)
    run = PreferenceRun(
        **vars(setup),
        workdir=storage.as_path(workdir),
        loss_fn=loss_fn,
        datasets=datasets,
        references=references,
        layout=layout,
        score_window=score_window,
        preference_direction=direction,
        packing=packing,
    )
    if layout.in_state:
        if references[0].params is not None:  # None: LoRA's base reference, the policy's own weights
            check_mixable(
                references[0],
                setup.state["params"],
                "config.reference_sync" if layout.sync.every else "train.iterations > 1 (in-step)",
            )
        hold_reference_in_state(run)
    return run


def check_mixable(primary: Reference, params: Any, setting: str) -> None:
    """A ValueError naming `setting` and the reference when the policy's `params` cannot move into the primary
    reference's place: parameters of other names, shapes or dtypes (the sync's α·θ + (1 − α)·θ_ref is taken leaf
    by leaf; iterated training copies θ; a reference with another tokenizer is refused before, by the in-step
    check of `build_run`)."""
    shapes = lambda tree: jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), tree)  # noqa: E731
    if jax.tree.structure(primary.params) != jax.tree.structure(params) or shapes(primary.params) != shapes(params):
        raise ValueError(
            f"{setting} with the primary reference config.references[0] ({primary.name}): its "
            "parameters are not shaped as the policy's (another architecture), and the policy's "
            "weights move into it (α·θ + (1 − α)·θ_ref, or a copy): it needs the policy's shapes"
        )


def hold_reference_in_state(run: PreferenceRun) -> None:
    """Move the primary reference's parameters into the train state as `"reference"` (kept in their sharding,
    the policy's for the initial policy; checkpointed and donated with the state); `run.references[0].params`
    becomes None.

    LoRA's base reference (adapters off, no parameters of its own) becomes a second adapter set on the policy's
    graphdef and base, all zeros: B·A = 0 adds exactly nothing, so it scores as the base does, and a sync
    (mix = 1) copies the policy's adapters into it — only adapters are held twice, never the base."""
    primary = run.references[0]
    reference = primary.params
    if reference is None:
        policy = run.state["params"]
        reference = jax.tree.map(lambda x: jax.device_put(jnp.zeros_like(x), x.sharding), policy)
        primary = dataclasses.replace(primary, graphdef=run.graphdef, rest=None)
    run.state, run.state_shardings = state_with_reference(run.state, run.state_shardings, reference)
    run.references[0] = dataclasses.replace(primary, params=None)


# ------------------------------------------------------------------------------------------------ references
def fill_reference_cache(run: PreferenceRun) -> None:
    """Precompute `[N, K, R]` reference log-probs for every split (cached under WORKDIR/ref_cache). Then, unless
    iterated training scores again (`train.iterations > 1`), the frozen references' parameters are let go (nothing
    reads them again; `params` None) and, with the CPU step memory reuse, the heap's free pages go back to the
    kernel (the scorers' buffers, those parameters: the train step's buffer is of another size)."""
    if not run.references or run.in_step_refs:
        return
    run.ref_cache = reference_cache_of(run)
    if run.config.train.iterations <= 1:
        run.references = [dataclasses.replace(r, params=None) if r.params is not None else r for r in run.references]
    if reuse_applied():
        release_free_memory()


def reference_cache_of(run: PreferenceRun) -> dict[str, np.ndarray]:
    """split → `[N, K, R]` log-probs of the run's references (cached under WORKDIR/ref_cache)."""
    cfg = run.config
    per_process = local_batch_size(cfg.data.eval_batch_size, run.mesh)
    cache_dir = storage.as_path(cfg.reference_cache_dir or storage.as_path(run.workdir) / REFERENCE_CACHE)
    scorers = [
        scorer(
            cfg,
            run,
            ref.graphdef,
            ref.rest,
            run.score_window if ref.datasets is run.datasets else score_window_of(cfg, ref.datasets, run.mesh),
        )
        for ref in run.references
    ]
    cache = {}
    for split, ds in run.datasets.items():
        columns = []
        for i, (ref, score) in enumerate(zip(run.references, scorers)):
            compute = lambda i=i, ref=ref, score=score: compute_logps(  # noqa: E731  (params None: the policy's)
                score,
                run.state["params"] if ref.params is None else ref.params,
                ref.datasets[split],
                per_process,
                run.mesh,
                prepare=lambda batch: pack_local(batch, run.packing, run.mesh),
                description=f"reference {i} log-probs ({split} split)",
                progress=cfg.train.progress_bar,
            )
            columns.append(cached_logps(cache_dir, ref, split, compute))
        values = np.stack(columns, axis=-1)  # [N, K, R]
        check_cache_complete(values, ds, split)
        cache[split] = values
    return cache


def check_cache_complete(values: np.ndarray, ds: TokenizedDataset, split: str) -> None:
    """A ValueError naming file:line when a reference has no log-prob for a response the policy trains on (its
    own tokenizer dropped the record)."""
    for e in ds.examples:
        k = len(e.sequences)
        if np.isnan(values[e.index, :k]).any():
            file, line = ds.records[e.index].source
            raise ValueError(
                f"{file}:{line}: a reference tokenizer dropped this record ({split}); raise "
                "data.max_length or use truncation='truncate_prompt'"
            )


def with_references(run: PreferenceRun, batch: dict[str, np.ndarray], split: str) -> dict[str, np.ndarray]:
    """Add `ref_logps [B, K, R]` from the cache (cache mode), by record index ([B, K] for a single-reference
    loss)."""
    if not run.ref_cache:
        return batch
    index = batch["index"]
    ref = run.ref_cache[split][np.maximum(index, 0)]
    ref = np.where(batch["valid"][..., None], np.nan_to_num(ref), 0.0).astype(np.float32)
    if ref.shape[-1] == 1 and not run.loss_fn.spec.num_references:
        ref = ref[..., 0]
    return {**batch, "ref_logps": ref}


def device_batch(
    run: PreferenceRun, batch: dict[str, np.ndarray], split: str, *, micro_batches: int = 1
) -> dict[str, jax.Array]:
    """A host batch of `split` (this process's rows) → a step's global input, cached references added, packed
    (`config.data.packing`) for a step that splits it into `micro_batches` (1: the eval step, the scorers)."""
    batch = pack_local(with_references(run, batch, split), run.packing, run.mesh, micro_batches=micro_batches)
    batch = {k: v for k, v in batch.items() if k != "index"}
    return to_global(batch, run.mesh)


def train_batch(run: PreferenceRun, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """A host batch of the train split → the train step's input: packed rows laid out per micro-batch
    (`config.data.micro_batches`, which the step splits the batch into); unpaired records in micro-batch order
    (micro-batch m: the m-th block of consecutive records, as TRL's per-device batches)."""
    micro_batches = int(run.config.data.micro_batches)
    if run.loss_fn.spec.unpaired:
        batch = in_micro_batch_order(batch, micro_batches)
    return device_batch(run, batch, "train", micro_batches=micro_batches)


def step_reference_params(run: PreferenceRun) -> tuple:
    """What the train step takes as `ref_params`: every in-step reference's parameters, or, when the primary's
    live in the train state, the others only (the step reads the primary from the state)."""
    if not run.in_step_refs:
        return ()
    return tuple(r.params for r in run.references[1 if run.reference_sync is not None else 0 :])


def in_step_reference_params(run: PreferenceRun, reference: Any = None) -> tuple:
    """The reference parameters the eval step scores (in-step mode), primary first, else (). `reference`: the
    primary's parameters of the moment, the train state's `"reference"` when they live there (then required):
    `step_reference_params` with it put first."""
    if not run.in_step_refs or run.reference_sync is None:
        return step_reference_params(run)
    if reference is None:
        raise ValueError("the primary reference lives in the train state: pass state['reference']")
    return (reference, *step_reference_params(run))


def reset_state_reference(state: dict[str, Any]) -> dict[str, Any]:
    """Iterated training with the reference in the train state: the state with `"reference"` a copy of its
    `"params"` (the previous iterate)."""
    return {**state, "reference": jax.tree.map(jnp.copy, state["params"])}


def reset_reference_to_policy(run: PreferenceRun, params, step: int) -> None:
    """Iterated training: the primary reference becomes the current policy (the previous iterate); its cached
    log-probs are recomputed. Other references (MRPO) stay as they are."""
    primary = run.references[0]
    if primary.datasets is not run.datasets:
        raise ValueError("train.iterations > 1 needs a primary reference with the policy's tokenizer")
    run.references[0] = dataclasses.replace(
        primary,
        name=INITIAL_POLICY,
        graphdef=run.graphdef,
        rest=run.rest,
        params=jax.tree.map(jnp.copy, params),
        fingerprint=f"{primary.fingerprint}+iterate@{step}",
    )
    fill_reference_cache(run)


# ------------------------------------------------------------------------------------------------ eval
def eval_arguments(run: PreferenceRun, state: dict[str, Any], batch: dict[str, jax.Array]) -> tuple:
    """The eval step's arguments for a device `batch`: the train state's parameters, the batch, the in-step
    references' parameters (`in_step_reference_params`, the state's `"reference"` first when it lives there) and,
    for a stateful loss (`bco`), the state's `"loss_state"`."""
    args = (state["params"], batch, in_step_reference_params(run, state.get("reference")))
    return args + ((state["loss_state"],) if run.loss_fn.spec.stateful else ())


def evaluate(run: PreferenceRun, state: dict[str, Any], eval_step) -> dict[str, float]:
    """Loss and metrics over the whole eval split of the train `state`: each batch's means weighted by its examples
    with a valid response (batches of padding only are left out), an unpaired loss's per-label metrics by the
    rows of the label (`label_sums` / `label_means`). The references are those of the moment (`eval_arguments`:
    a reference in the train state is evaluated as it is, as TRL's synced ref_model)."""
    if "eval" not in run.datasets:
        return {}

    def sums_of(batch):
        loss, weight, metrics = jax.device_get(eval_step(*eval_arguments(run, state, device_batch(run, batch, "eval"))))
        if weight == 0:
            return {}
        return {"loss": loss, "weight": weight, **label_sums(metrics, weight)}

    totals = sum_over_eval_batches(run.datasets["eval"], run.config.data.eval_batch_size, run.mesh, sums_of)
    weight = totals.pop("weight", 0.0)
    return label_means(totals, weight) if weight else {}


# ------------------------------------------------------------------------------------------------ the job
def restore_position(run: PreferenceRun, iterator, data_state, step: int) -> None:
    """Put the data iterator back at `step` of a resumed run. Iterated training (`train.iterations > 1`) with
    in-step references holds the primary reference in the train state, so a checkpoint anywhere resumes exactly.
    With cached references, a resume inside an iteration after the first is refused: its primary reference is the
    policy of the iteration's first step, which the checkpoint does not hold (a resume there would train against
    the initial policy). At an iteration boundary the reference is reset from the restored policy as in an
    uninterrupted run."""
    steps = run.config.train.steps
    if (
        run.config.train.iterations > 1
        and run.references
        and run.reference_sync is None
        and step > steps
        and step % steps
    ):
        boundary = step - step % steps
        raise ResumeError(
            f"{run.workdir}: the checkpoint restored is at step {step}, inside iteration "
            f"{step // steps + 1} of train.iterations={run.config.train.iterations}; its reference (the "
            f"policy at step {boundary}) is not in the checkpoint, so the run cannot continue exactly. "
            f"Remove the checkpoints after step {boundary} to resume from there (if it is kept), or "
            "use another --workdir (a run with reference_mode='in_step' checkpoints its reference)"
        )
    iterator.set_state(data_state)


def step_flops(run: PreferenceRun, inputs: Mapping[str, Any], scored: int) -> float:
    """FLOPs of one train step on the global batch `inputs` whose losses score `scored` tokens (`batch_flops`):
    its in-step references, the score window of padded batches, and for packed rows the output head on the
    scored slots where the step unembeds those alone (`Packing.head_cost` > 0), on every slot otherwise."""
    return batch_flops(
        run.model_config,
        inputs["tokens"].shape,
        num_references=len(run.references) if run.in_step_refs else 0,
        score_window=run.score_window,
        head_positions=scored if is_packed(inputs) and run.packing.head_cost else None,
    )


def run_steps(run: PreferenceRun) -> tuple[WithFrozen, WithFrozen]:
    """(train step, eval step) of `run` from the one program builder (`jitted_steps`): its in-step references'
    graphdefs, score window and reference sync — the programs `rpo-train`, the benchmarks and the tests run."""
    ref_graphdefs = tuple((r.graphdef, r.rest) for r in run.references) if run.in_step_refs else ()
    return jitted_steps(
        run.config, run, run.loss_fn, ref_graphdefs, run.score_window, reference_sync=run.reference_sync
    )


def preference_task(
    run: PreferenceRun, steps: tuple[WithFrozen, WithFrozen] | None = None, generation_eval=None
) -> Task:
    """The run skeleton's task: one unit is one optimizer step on the next batch of the resumable iterator
    (`steps`: `run_steps(run)`, made here when not given; `generation_eval`: a
    `rpo_jax.train.jobs.generation_eval.TrainingEval`, run every `config.eval.generation.every` steps)."""
    cfg = run.config
    rows = process_rows(run.mesh)
    iterator = train_iterator(run.datasets["train"], cfg, run.mesh)
    train_step, eval_step = steps or run_steps(run)
    if run.packing is not None:
        log.info("packing (config.data.packing): %s", packing_summary(run.packing))
    if run.score_window:
        log.info(
            "output head on %d logit positions per sequence of padded batches (config.model.score_window)",
            run.score_window,
        )
    if run.reference_sync is not None and run.reference_sync.every:
        log.info(
            "reference sync (TR-DPO): after every %d optimizer steps the reference becomes %g·θ + %g·θ_ref",
            run.reference_sync.every,
            run.reference_sync.mix,
            1.0 - run.reference_sync.mix,
        )

    heap = HeapGuard()

    def advance(state, step: int) -> Unit:
        if cfg.train.iterations > 1 and step > 0 and step % cfg.train.steps == 0 and run.references:
            if run.reference_sync is not None:
                state = reset_state_reference(state)
            else:
                reset_reference_to_policy(run, state["params"], step)
        batch = next(iterator)
        inputs = train_batch(run, batch)
        # FLOPs of the whole step over all processes (the global batch's shape and scored slots)
        flops = step_flops(run, inputs, scored_tokens(batch) * rows.count)
        tokens = float(real_tokens(batch)) * rows.count  # prompt + response tokens, whatever the layout
        heap.before_step(inputs["tokens"].shape)  # a larger batch's buffer goes not on top of freed ones
        state, metrics = train_step(state, inputs, step_reference_params(run))
        heap.after_step()  # a step's buffer that the heap could not reuse is not kept (cpu_memory.HeapGuard)
        # packed or padded; real tokens per slot the step computes (> 1 where shared prompts saved slots)
        layout = {"packed": float(is_packed(inputs)), "tokens_per_slot": tokens / inputs["tokens"].size}
        return Unit(state, {**metrics, **layout}, {"tokens": tokens}, flops)

    objective = {
        "loss": cfg.loss,
        "references": list(cfg.references),
        "preference_direction": run.preference_direction,
        "iterations": max(1, cfg.train.iterations),
    }
    if run.reference_sync is not None:  # only then: the identities (and checkpoints) of other runs are unchanged
        objective["reference_in_checkpoint"] = True
        if run.reference_sync.every:
            objective["reference_sync"] = run.reference_sync._asdict()
    identity = run_identity(
        cfg,
        PREFERENCE,
        run.model_config,
        run.tokenizer,
        objective=objective,
        data={split: dataset_fingerprint(ds) for split, ds in run.datasets.items()},
    )
    return Task(
        mode=PREFERENCE,
        run=run,
        identity=identity,
        units=cfg.train.steps * max(1, cfg.train.iterations),
        advance=advance,
        evaluate=lambda state, step: evaluate(run, state, eval_step),
        eval_input=lambda state: state,
        data_state=lambda step: iterator.get_state(),
        restore_data=lambda data_state, step: restore_position(run, iterator, data_state, step),
        log_every=cfg.train.log_every,
        eval_every=cfg.train.eval_every,
        label="rpo-train",
        mfu_dtype=run.dtype,
        log_filter=drop_empty_labels,
        side_eval=None if generation_eval is None else lambda state, step: generation_eval(state["params"], step),
        side_eval_every=int(cfg.eval.generation.every) if generation_eval is not None else 0,
        side_eval_done=generation_eval.done if generation_eval is not None else lambda: None,
    )


def train(
    cfg: ml_collections.ConfigDict, workdir: str | os.PathLike, *, precompute_only: bool = False, devices=None
) -> dict[str, Any]:
    """Run the configured preference training in `workdir`; returns the final train and eval metrics
    (`rpo_jax.train.core.runner.run_task`), or with `precompute_only` only the reference cache's shapes (nothing else
    is written to `workdir` then). `cfg` is validated first (`rpo_jax.train.config.validation.validate`)."""
    run = build_run(cfg, workdir, devices=devices)
    steps = run_steps(run)
    if not precompute_only:
        run, steps = fitting_preference_run(run, steps)
    fill_reference_cache(run)
    if precompute_only:
        return {"reference_cache": {k: list(v.shape) for k, v in run.ref_cache.items()}}
    from rpo_jax.train.jobs.generation_eval import build_training_eval  # config.eval.generation (None when off)

    return run_task(preference_task(run, steps, build_training_eval(run)), workdir)


def fitting_preference_run(
    run: PreferenceRun, steps: tuple[WithFrozen, WithFrozen]
) -> tuple[PreferenceRun, tuple[WithFrozen, WithFrozen]]:
    """`(run, steps)` that pass the fit check (`check_memory`): the configured ones, else the first rung of
    `rpo_jax.train.build.fit.lighter_settings` that fits (`fitting_run`: logged), else `DoesNotFit`."""

    def lighten(settings):
        lighter = lighter_run(run, settings)
        return lighter, run_steps(lighter)

    shards = run.mesh.shape["data"] * run.mesh.shape["fsdp"]
    check = lambda candidate: check_memory(*candidate)  # noqa: E731
    return fitting_run((run, steps), check, lighten, run.config, shards)


def lighter_run(run: PreferenceRun, settings: Mapping[str, Any]) -> PreferenceRun:
    """`run` with result-preserving `settings` (`rpo_jax.train.build.fit.lighter_settings`: "model.attention",
    "model.remat", "data.micro_batches"): `lighter_setup`, and every reference's graphdef with the model ones
    (`with_speed_settings`); the same arrays."""
    model = model_settings(settings)

    def reference_graphdef(r: Reference):
        params = run.state.get("reference") if r.params is None else r.params  # None: let go after its cache fill
        if not model or params is None:
            return r.graphdef
        return with_speed_settings(r.graphdef, params, r.rest, **model)

    references = [dataclasses.replace(r, graphdef=reference_graphdef(r)) for r in run.references]
    return dataclasses.replace(lighter_setup(run, settings), references=references)


def check_memory(run: PreferenceRun, steps: tuple[WithFrozen, WithFrozen]) -> None:
    """The fit check before step 1 (`rpo_jax.train.build.fit`) against `train.memory_budget`: the train step
    compiled for each distinct input of the run's first `FIT_LOOKAHEAD_STEPS` steps (from the run's start, also
    when it resumes: the programs those steps run — packed or padded, each row shape — and then call without
    compiling), for the split's largest batch too when the run is longer (`largest_batch`: the bound for the steps
    after), and the eval step for the eval split's largest batch (cached reference log-probs as zeros of their
    shape). A run that does not fit stops here (`DoesNotFit`), before the cache fill or anything else is
    written."""
    cfg = run.config
    if memory_budget_bytes(cfg.train.memory_budget, 1) is None:
        return
    train_step, eval_step = steps
    sizes = {"train": cfg.data.batch_size, "eval": cfg.data.eval_batch_size}
    largest = {
        split: largest_batch(run.datasets[split], local_batch_size(size, run.mesh))
        for split, size in sizes.items()
        if split in run.datasets
    }
    probe, held = run, 0
    if run.references and not run.in_step_refs:  # filled after the check
        shapes = {
            s: (run.datasets[s].num_records, b["valid"].shape[1], len(run.references)) for s, b in largest.items()
        }
        probe = dataclasses.replace(run, ref_cache={s: np.zeros(shape, np.float32) for s, shape in shapes.items()})
        held = sum(device_bytes(r.params) for r in run.references if r.params is not None)
    units = cfg.train.steps * max(1, cfg.train.iterations)
    first = itertools.islice(train_iterator(run.datasets["train"], cfg, run.mesh), min(units, FIT_LOOKAHEAD_STEPS))
    inputs = distinct_inputs(train_batch(probe, b) for b in first)
    if units > FIT_LOOKAHEAD_STEPS:
        inputs = distinct_inputs([*inputs, train_batch(probe, largest["train"])])
    programs = [("train step", train_step, (run.state, x, step_reference_params(run)), held) for x in inputs]
    if "eval" in largest:
        eval_args = eval_arguments(run, run.state, device_batch(probe, largest["eval"], "eval"))
        programs.append(("eval step", eval_step, eval_args, held))
    batches = f"the train batches of the first {min(units, FIT_LOOKAHEAD_STEPS)} steps"
    batches += ", the largest train batch" if units > FIT_LOOKAHEAD_STEPS else ""
    batches += ", the largest eval batch" if "eval" in largest else ""
    log_fit(log, *check_programs_fit(programs, cfg, local_devices(run.mesh), batches))
