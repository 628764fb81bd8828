"""Generation-based evaluation: the policy answers held-out prompts, a judge compares each answer with a
baseline's, and the statistics of `rpo_jax.models.win_rates` say whether the policy writes better responses.

Used in preference and online training (`config.eval.generation`: every `every` steps — iterations in online
mode — and at the end, metrics `eval/generation/…`, records in WORKDIR/generations/step_N.jsonl) and by `rpo-eval`
(`rpo_jax.train.cli.evaluate`).

Per evaluation:

1. **Prompts**: a fixed subset of `num_prompts` (drawn once with `config.seed`) of the held-out split or of a
   prompts file, each encoded as the training prompts are (chat template; longer than `data.max_prompt_length`:
   dropped or left-truncated as `data.truncation` says).
2. **Samples**: `samples_per_prompt` responses per prompt from the program builder's sampler
   (`rpo_jax.train.build.programs.sampler`, sharded as training; KV cache; EOS, stop strings, `max_new_tokens`),
   the batch padded with copies of the first prompt to a multiple of the data-parallel shards (those rows are
   dropped). The key is a function of (seed, step): the same evaluation on 1 or 8 devices gives the same samples.
3. **Baseline**: the initial policy's (or the reference's, or an exported model's) samples, generated once with
   their own key and cached in WORKDIR/generations/baseline.jsonl; or the data's chosen responses.
4. **Judgment**: sample s of the policy against sample s of the baseline (the chosen response for every s).
5. **Statistics**: `win_rate` (ties 0.5) with its paired bootstrap 95 % interval over prompts, `lc_win_rate`,
   `length_ratio` (lengths in the policy tokenizer's tokens), `reward` and `baseline_reward` (reward judges) with the
   reward's interval, `kl` (Σ log π − log π_ref over the policy's sampled tokens: log π from the sampler, log π_ref
   from the scorer; π_ref the initial policy in training, the baseline model in rpo-eval when it shares the
   tokenizer),
   `distinct_2` (bigrams of the policy's token ids), `position_bias` (LLM judges).

Records (one JSON line per prompt and sample): prompt, policy and baseline responses, their lengths, the
preference and rewards. Files are written whole and renamed into place, so an evaluation interrupted (kill -9)
leaves no partial file and is simply done again on resume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from rpo_jax.data import PromptRecord, read_prompts, read_records, storage
from rpo_jax.data.online_batches import encode_prompts, left_pad, prompt_for_reward, sample_batch
from rpo_jax.models import truncate_at_stop_strings
from rpo_jax.models.judges import PairJudge, position_bias
from rpo_jax.models.win_rates import distinct_n, kl_estimate, lc_win_rate, length_ratio, paired_bootstrap_ci, win_rate
from rpo_jax.train.build.data import data_paths
from rpo_jax.train.build.programs import sampler, scorer
from rpo_jax.train.build.state import RunSetup
from rpo_jax.train.runtime.global_batches import batch_multiple, local_rows, to_global
from rpo_jax.train.step.logprobs import resolve_score_window

log = logging.getLogger(__name__)

GENERATIONS = "generations"
BASELINE_FILE = "baseline.jsonl"


# --------------------------------------------------------------------------------------------- prompts
@dataclasses.dataclass
class EvalPrompts:
    """The evaluated prompts, their token ids in the policy's tokenizer, and (for `baseline="chosen"`) each
    prompt's chosen response."""

    prompts: list[PromptRecord]
    ids: list[list[int]]
    chosen: list[str] | None = None

    def fingerprint(self) -> str:
        """sha256 of the prompts' token ids (the baseline cache's key)."""
        return hashlib.sha256(json.dumps(self.ids).encode()).hexdigest()[:16]


def chosen_text(record) -> str:
    """The chosen response of a preference record: a labelled pair's first, else the highest reward's; a
    ValueError naming file:line when neither is known."""
    if record.labelled:
        return record.response_text(0)
    if record.rewards is None:
        file, line = record.source
        raise ValueError(f"{file}:{line}: baseline 'chosen' needs a labelled pair or rewards; this record has neither")
    return record.response_text(int(np.argmax(record.rewards)))


def select_prompts(
    records: Sequence[Any], tokenizer, cfg, gen, *, seed: int, want_chosen: bool, where: str
) -> EvalPrompts:
    """`EvalPrompts` from records (`PromptRecord`s, or `PreferenceRecord`s which also give the chosen response):
    each prompt once (its first record), encoded (`encode_prompts`), then a fixed subset of `gen.num_prompts`
    drawn with `seed` (all when fewer)."""
    if want_chosen and not all(hasattr(r, "responses") for r in records):
        raise ValueError(f"{where}: baseline 'chosen' needs preference records (responses), not prompts alone")
    seen, unique = set(), []
    for r in records:  # each prompt once (unpaired records, several files)
        key = tuple((m["role"], m["content"]) for m in r.prompt)
        if key not in seen:
            seen.add(key)
            unique.append(r)
    prompts = [PromptRecord(r.prompt, r.conversational, r.source) for r in unique]
    keep = {id(p): r for p, r in zip(prompts, unique)}
    kept, ids, dropped = encode_prompts(
        prompts, tokenizer, max_prompt_length=cfg.data.max_prompt_length, truncation=cfg.data.truncation
    )
    if dropped:
        log.warning("%s: dropped %d prompts longer than data.max_prompt_length", where, dropped)
    if not kept:
        raise ValueError(
            f"{where}: no prompt to evaluate (longer than data.max_prompt_length={cfg.data.max_prompt_length})"
        )
    index = np.arange(len(kept))
    if len(kept) > gen.num_prompts:
        index = np.sort(np.random.default_rng(seed).choice(len(kept), size=gen.num_prompts, replace=False))
    chosen = [chosen_text(keep[id(kept[i])]) for i in index] if want_chosen else None
    return EvalPrompts([kept[i] for i in index], [ids[i] for i in index], chosen)


def read_eval_records(spec: str, *, want_chosen: bool, on_error: str = "raise") -> list[Any]:
    """The records of a prompts file or preference data file (`"demo"`: the demo's test split): preference
    records when the baseline is the chosen response, else prompts (any preference file is a prompts file)."""
    paths = data_paths(spec, "eval")
    if want_chosen:
        return read_records(paths, on_error=on_error)[0]
    return read_prompts(paths, on_error=on_error)[0]


# --------------------------------------------------------------------------------------------- sampling
@dataclasses.dataclass
class Generator:
    """A model that answers prompts: the builder's sampler and scorer on its graph, sharded on `setup.mesh`."""

    setup: RunSetup  # graphdef, rest, mesh, dtype, tokenizer (a RunSetup or any object with those)
    sample_fn: Any  # programs.sampler
    score_fn: Any  # programs.scorer: [P, K] response log-probs
    pad_id: int
    prompt_width: int
    max_new_tokens: int
    stop_strings: tuple[str, ...]


def make_generator(cfg, setup, gen, eos_ids: tuple[int, ...]) -> Generator:
    """The `Generator` of `setup`'s model with `gen`'s sampling settings (`config.eval.generation`)."""
    pad = setup.tokenizer.pad_token_id
    pad = int(pad if pad is not None else eos_ids[0])
    window = resolve_score_window(cfg.model.score_window, int(gen.max_new_tokens))
    return Generator(
        setup=setup,
        sample_fn=sampler(cfg, setup, eos_ids, pad, gen),
        score_fn=scorer(cfg, setup, setup.graphdef, setup.rest, window),
        pad_id=pad,
        prompt_width=int(cfg.data.max_prompt_length),
        max_new_tokens=int(gen.max_new_tokens),
        stop_strings=tuple(gen.stop_strings),
    )


def _shards(mesh) -> int:
    return batch_multiple(mesh)


def _global(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """Rows every process holds whole → global arrays, each process feeding its share (`local_rows`)."""
    return to_global(local_rows(batch, mesh), mesh)


@dataclasses.dataclass
class Samples:
    """`[P][S]` response texts, `tokens`/`mask` `[P, S, M]` (the generated ids) and `logps [P, S]` (Σ log π of
    each sample's tokens under the sampling model's unmodified distribution, from the sampler)."""

    texts: list[list[str]]
    tokens: np.ndarray
    mask: np.ndarray
    logps: np.ndarray


def generate(g: Generator, params, ids: Sequence[Sequence[int]], samples: int, key: jax.Array) -> Samples:
    """`samples` responses per prompt from the model with `params` (module docstring, step 2)."""
    flat = [p for p in ids for _ in range(samples)]
    n = len(flat)
    flat += [flat[0]] * (-n % _shards(g.setup.mesh))
    tokens, mask = left_pad(flat, g.prompt_width, g.pad_id)
    inputs = _global({"tokens": tokens, "mask": mask}, g.setup.mesh)
    out = g.sample_fn(params, inputs["tokens"], inputs["mask"], key)
    if g.stop_strings:
        out = truncate_at_stop_strings(out, g.setup.tokenizer, g.stop_strings, pad_token_id=g.pad_id)
    gen_tokens, gen_mask, logps = (np.asarray(x)[:n] for x in jax.device_get((out.tokens, out.mask, out.logps)))
    m = gen_tokens.shape[-1]
    gen_tokens, gen_mask = gen_tokens.reshape(len(ids), samples, m), gen_mask.reshape(len(ids), samples, m)
    logps = np.where(gen_mask, logps.reshape(len(ids), samples, m), 0.0).sum(-1)
    decode = g.setup.tokenizer.decode
    texts = [
        [decode(gen_tokens[p, s][gen_mask[p, s]].tolist(), skip_special_tokens=True) for s in range(samples)]
        for p in range(len(ids))
    ]
    return Samples(texts, gen_tokens, gen_mask, logps)


def sample_logps(g: Generator, params, ids: Sequence[Sequence[int]], s: Samples) -> np.ndarray:
    """Σ log-probs `[P, S]` of the samples' tokens under the model of `g` with `params` (the scorer)."""
    batch = sample_batch(ids, s.tokens, s.mask, None, width=g.prompt_width + g.max_new_tokens, pad_id=g.pad_id)
    p = len(ids)
    pad = -p % _shards(g.setup.mesh)
    if pad:
        batch = {k: np.concatenate([v, np.repeat(v[:1], pad, axis=0)]) for k, v in batch.items()}
    return np.asarray(jax.device_get(g.score_fn(params, _global(batch, g.setup.mesh))))[:p]


# --------------------------------------------------------------------------------------------- judging
def response_lengths(tokenizer, texts: Sequence[Sequence[str]]) -> np.ndarray:
    """`[P, S]` token counts of response texts in `tokenizer` (no special tokens): one unit for both sides."""
    return np.asarray([[len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in row] for row in texts], float)


def judge_samples(
    prompts: EvalPrompts,
    policy: Sequence[Sequence[str]],
    baseline: Sequence[Sequence[str]],
    judge: PairJudge,
    tokenizer,
    *,
    bootstrap_seed: int = 0,
    kl: float | None = None,
    policy_ids: Sequence[Sequence[Sequence[int]]] | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]], dict[str, np.ndarray]]:
    """Judge policy sample s against baseline sample s of every prompt and compute the statistics.

    Args:
        prompts: the evaluated prompts (P).
        policy: `[P][S]` policy responses.
        baseline: `[P][S]` baseline responses (or `[P][1]`: the same one against every policy sample).
        judge: the `PairJudge` (policy as A).
        tokenizer: the policy's tokenizer (lengths).
        bootstrap_seed: the bootstrap's seed.
        kl: the KL estimate to report, if computed.
        policy_ids: `[P][S]` the policy samples' token ids (distinct-2), else their texts' tokens.

    Returns:
        `(metrics, records, arrays)`: metrics named as `config.eval.generation` logs them (without the
        `eval/generation/` prefix), one record per prompt and sample, and `{"policy_lengths", "baseline_lengths"}`.
    """
    n, s = len(policy), len(policy[0])
    base = [[row[j % len(row)] for j in range(s)] for row in baseline]
    flat_prompts = [prompt_for_reward(p) for p in prompts.prompts for _ in range(s)]
    verdict = judge(flat_prompts, [t for row in policy for t in row], [t for row in base for t in row])
    prefs = np.asarray(verdict.prefs, np.float64).reshape(n, s)
    lp, lb = response_lengths(tokenizer, policy), response_lengths(tokenizer, base)
    low, high = paired_bootstrap_ci(prefs, seed=bootstrap_seed)
    metrics = {
        "win_rate": win_rate(prefs),
        "win_rate_ci_low": low,
        "win_rate_ci_high": high,
        "lc_win_rate": lc_win_rate(prefs, lp - lb),
        "length_ratio": length_ratio(lp, lb),
        "length": float(lp.mean()),
        "baseline_length": float(lb.mean()),
        "distinct_2": distinct_n(
            [ids for row in policy_ids for ids in row]
            if policy_ids is not None
            else [t for row in policy for t in row],
            2,
        ),
        "num_prompts": float(n),
    }
    if verdict.rewards_a is not None:
        ra, rb = verdict.rewards_a.reshape(n, s), verdict.rewards_b.reshape(n, s)
        r_low, r_high = paired_bootstrap_ci(ra, seed=bootstrap_seed)
        metrics.update(
            reward=float(ra.mean()), reward_ci_low=r_low, reward_ci_high=r_high, baseline_reward=float(rb.mean())
        )
    if verdict.first_position is not None:
        metrics["position_bias"] = position_bias(verdict.first_position)
    if kl is not None:
        metrics["kl"] = float(kl)
    records = []
    for i, p in enumerate(prompts.prompts):
        for j in range(s):
            k = i * s + j
            rec = {
                "prompt": prompt_for_reward(p),
                "sample": j,
                "policy": policy[i][j],
                "baseline": base[i][j],
                "preference": float(prefs[i, j]),
                "policy_length": int(lp[i, j]),
                "baseline_length": int(lb[i, j]),
            }
            if verdict.rewards_a is not None:
                rec.update(policy_reward=float(verdict.rewards_a[k]), baseline_reward=float(verdict.rewards_b[k]))
            if verdict.first_position is not None:
                rec["first_position"] = float(verdict.first_position[k])
            records.append(rec)
    return metrics, records, {"policy_lengths": lp.reshape(-1), "baseline_lengths": lb.reshape(-1)}


def write_jsonl(path: storage.PathLike, records: Sequence[dict[str, Any]]) -> None:
    """Write records as JSON lines, whole (`storage.write_atomically`)."""
    storage.write_atomically(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


# --------------------------------------------------------------------------------------------- baseline cache
def cached_baseline(
    directory: storage.PathLike, key: dict[str, Any], make: Callable[[], list[list[str]]]
) -> list[list[str]]:
    """The baseline's `[P][S]` texts from `directory/baseline.jsonl` when its first line records the same `key`
    (baseline, prompts, sampling settings), else `make()`, written there first (whole)."""
    path = storage.as_path(directory) / BASELINE_FILE
    if path.exists():
        lines = path.read_text().splitlines()
        if lines and json.loads(lines[0]).get("key") == key:
            log.info("baseline samples: %s (cached)", path)
            return [json.loads(line)["responses"] for line in lines[1:]]
        log.info("baseline samples: %s was made with other settings; generating again", path)
    texts = make()
    storage.as_path(directory).mkdir(parents=True, exist_ok=True)
    write_jsonl(path, [{"key": key}] + [{"responses": row} for row in texts])
    return texts


# --------------------------------------------------------------------------------------------- models
def model_generator(path: str, cfg, gen, mesh, dtype) -> tuple[Generator, Any]:
    """(`Generator`, parameters) of an exported model directory (its own tokenizer), on `mesh`."""
    from types import SimpleNamespace

    from rpo_jax.train.build.data import load_tokenizer
    from rpo_jax.train.build.model import eos_ids_of, load_model, split_trainable

    if not storage.as_path(path).is_dir():
        raise ValueError(f"{path}: not a model directory")
    tokenizer = load_tokenizer(path)
    model, model_config = load_model(path, cfg, mesh, dtype, vocab_size=len(tokenizer))
    graphdef, params, rest = split_trainable(model)
    setup = SimpleNamespace(graphdef=graphdef, rest=rest, mesh=mesh, dtype=dtype, tokenizer=tokenizer)
    return make_generator(cfg, setup, gen, eos_ids_of(tokenizer, model_config)), params


def ids_for(g: Generator, prompts: EvalPrompts, cfg) -> list[list[int]]:
    """The prompts' token ids in `g`'s tokenizer (a baseline with its own); a ValueError when one is too long."""
    kept, ids, dropped = encode_prompts(
        prompts.prompts, g.setup.tokenizer, max_prompt_length=cfg.data.max_prompt_length, truncation=cfg.data.truncation
    )
    if dropped:
        raise ValueError(
            f"{dropped} evaluated prompts are longer than data.max_prompt_length in the baseline's tokenizer"
        )
    return ids


def sampling_key(seed: int, stream: int, step: int) -> jax.Array:
    """The sampling key of an evaluation: a function of (seed, stream: 0 policy / 1 baseline, step) alone."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 1000 + stream), step)


def baseline_texts(
    spec: str, cfg, gen, prompts: EvalPrompts, policy: Generator, initial_params, directory
) -> list[list[str]]:
    """The baseline's `[P][S]` responses (`[P][1]` for "chosen"), generated once and cached in `directory`."""
    if spec == "chosen":
        return [[c] for c in prompts.chosen]
    if spec == "reference":
        spec = cfg.references[0].path if cfg.references and cfg.references[0].path else "initial"
    key = {
        "baseline": spec,
        "prompts": prompts.fingerprint(),
        "seed": int(cfg.seed),
        "sampling": {
            k: v
            for k, v in dict(gen).items()
            if k in ("samples_per_prompt", "max_new_tokens", "temperature", "top_k", "top_p", "stop_strings")
        },
    }
    key["sampling"]["stop_strings"] = list(key["sampling"]["stop_strings"])
    samples = int(gen.samples_per_prompt)

    def make():
        if spec == "initial":
            return generate(policy, initial_params, prompts.ids, samples, sampling_key(cfg.seed, 1, 0)).texts
        g, params = model_generator(spec, cfg, gen, policy.setup.mesh, policy.setup.dtype)
        return generate(g, params, ids_for(g, prompts, cfg), samples, sampling_key(cfg.seed, 1, 0)).texts

    return cached_baseline(directory, key, make)


# --------------------------------------------------------------------------------------------- in training
@dataclasses.dataclass
class TrainingEval:
    """`config.eval.generation` in a training run: `self(params, step)` → `{"generation/…": …}` (logged under
    eval/), WORKDIR/generations/step_N.jsonl; `done()` draws WORKDIR/generations/win_rate.png from metrics.jsonl."""

    cfg: Any
    workdir: storage.PathLike
    generator: Generator
    prompts: EvalPrompts
    judge: PairJudge
    baseline: list[list[str]]
    initial_params: Any  # π_ref of the KL estimate: a copy of the initial trainable parameters

    @property
    def directory(self):
        return storage.as_path(self.workdir) / GENERATIONS

    def __call__(self, params, step: int) -> dict[str, float]:
        gen = self.cfg.eval.generation
        s = generate(
            self.generator, params, self.prompts.ids, int(gen.samples_per_prompt), sampling_key(self.cfg.seed, 0, step)
        )
        valid = s.mask.any(-1)  # Σ log π from the sampler, Σ log π_ref from the scorer
        kl = kl_estimate(s.logps[valid], sample_logps(self.generator, self.initial_params, self.prompts.ids, s)[valid])
        policy_ids = [[row[m].tolist() for row, m in zip(s.tokens[p], s.mask[p])] for p in range(len(s.texts))]
        metrics, records, _ = judge_samples(
            self.prompts,
            s.texts,
            self.baseline,
            self.judge,
            self.generator.setup.tokenizer,
            bootstrap_seed=int(gen.bootstrap_seed),
            kl=kl,
            policy_ids=policy_ids,
        )
        if jax.process_index() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            write_jsonl(self.directory / f"step_{step}.jsonl", [{"step": step, **r} for r in records])
        return {f"generation/{k}": v for k, v in metrics.items()}

    def done(self) -> None:
        from rpo_jax.train.core.workdir import METRICS_FILE
        from rpo_jax.train.jobs.judging import plot_over_training

        if not self.cfg.eval.generation.plot or jax.process_index() != 0:
            return
        path = storage.as_path(self.workdir) / METRICS_FILE
        points = {}
        for line in path.read_text().splitlines() if path.exists() else []:
            r = json.loads(line)
            if "eval/generation/win_rate" in r:
                points[r["step"]] = tuple(
                    r[f"eval/generation/{k}"] for k in ("win_rate", "win_rate_ci_low", "win_rate_ci_high")
                )
        if plot_over_training(self.directory / "win_rate.png", [(k, *v) for k, v in sorted(points.items())]):
            log.info("win rate over training: %s", self.directory / "win_rate.png")


def build_training_eval(run) -> TrainingEval | None:
    """The `TrainingEval` of a preference run (`config.eval.generation.every` > 0; None when off), made before the
    first step while `run.state` holds the initial policy."""
    import jax.numpy as jnp

    from rpo_jax.train.build.model import eos_ids_of

    if not run.config.eval.generation.every:
        return None
    held_out = (run.datasets["eval"].records, "the held-out split") if "eval" in run.datasets else None
    return training_eval(
        run,
        run.workdir,
        eos_ids_of(run.tokenizer, run.model_config),
        jax.tree.map(jnp.copy, run.state["params"]),
        held_out,
    )


def training_eval(setup, workdir, eos_ids: tuple[int, ...], initial_params, held_out) -> TrainingEval:
    """The `TrainingEval` of a run (preference or online): prompts, judge, generator and the baseline's samples
    (cached in WORKDIR/generations).

    Args:
        setup: the run (`RunSetup`: config, graphdef, rest, mesh, dtype, tokenizer).
        workdir: the run directory.
        eos_ids: the ids that end a sample.
        initial_params: the initial trainable parameters (π_ref of the KL estimate; the "initial" baseline).
        held_out: `(records, where)` of the run's held-out split (`PromptRecord`s or preference records), or None
            when it has none (then `config.eval.generation.prompts` must name a file).
    """
    from rpo_jax.train.jobs.judging import make_judge

    cfg = setup.config
    gen = cfg.eval.generation
    want_chosen = gen.baseline == "chosen"
    if gen.prompts:
        held_out = read_eval_records(gen.prompts, want_chosen=want_chosen, on_error=cfg.data.on_error), gen.prompts
    elif held_out is None:
        split = "data.eval" if cfg.mode == "online" else "data.eval or data.eval_fraction"
        raise ValueError(
            f"config.eval.generation.prompts='' but the run has no held-out split: set {split}, or "
            "config.eval.generation.prompts"
        )
    records, where = held_out
    prompts = select_prompts(records, setup.tokenizer, cfg, gen, seed=cfg.seed, want_chosen=want_chosen, where=where)
    judge = make_judge(
        gen.judge,
        cfg,
        mesh=setup.mesh,
        dtype=setup.dtype,
        template=gen.judge_template,
        batch_size=int(cfg.data.eval_batch_size),
    )
    generator = make_generator(cfg, setup, gen, eos_ids)
    directory = storage.as_path(workdir) / GENERATIONS
    baseline = baseline_texts(gen.baseline, cfg, gen, prompts, generator, initial_params, directory)
    log.info(
        "generation eval: %d prompts × %d samples against %r, judge %s, every %d %s",
        len(prompts.ids),
        gen.samples_per_prompt,
        gen.baseline,
        gen.judge,
        gen.every,
        "iterations" if cfg.mode == "online" else "steps",
    )
    return TrainingEval(cfg, workdir, generator, prompts, judge, baseline, initial_params)
