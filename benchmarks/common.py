"""What every benchmark shares: the command line (`--config RECIPE` and `--config.KEY=VALUE` overrides, as
`rpo-train` takes them), synthetic preference files of given lengths, and the trainer's own programs.

A benchmark that times a preference step builds it as `rpo-train` does: a config (recipe + overrides), a run
(`rpo_jax.train.jobs.preference.build_run`: data, policy, references, state, layout), the reference cache when
the references are cached (`fill_reference_cache`), then `trainer_steps(run)` — the builder's `jitted_steps`
(`rpo_jax.train.build.programs`) called exactly as `preference_task` calls it, with the trainer's donation and
out_shardings — fed `train_batch(run, host batch)` and `step_reference_params(run)`. What a benchmark compares
(cached vs in-step references, LoRA ranks, QLoRA, packing) is a config override, each mode its own run.

Synthetic data (`write_synthetic`): K-response records whose prompt and responses are random characters of the
demo's character tokenizer (one token per character), so that their token counts are exactly the lengths asked
for; `synthetic_config` points `config.data.train` at the file, tokenizes it with that tokenizer
(`config.model.tokenizer`; the model keeps its own vocabulary, token ids < 52 of it) and sets `data.max_length`
/ `max_prompt_length` to the lengths (so a padded batch is [B, K, prompt + response] exactly).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import pathlib
import resource
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
RECIPES = pathlib.Path(__file__).resolve().parent / "configs"
QUICKSTART = REPO / "configs" / "quickstart.py"
SMOLLM2_SHAPE = RECIPES / "smollm2_shape.py"
LLAMA_1B_SHAPE = RECIPES / "llama3_2_1b_shape.py"
ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"

CONFIG_HELP = (
    "the recipe (configs/NAME.py, or benchmarks/configs/NAME.py); every config field can be overridden "
    "as in rpo-train: --config.KEY=VALUE (e.g. --config.data.batch_size=8 --config.model.remat=full "
    "--config.loss.name=dpo --config.model.path=DIR); fields and defaults: "
    "rpo_jax/train/config/defaults.py"
)


# ------------------------------------------------------------------------------------------------ command line
def is_override(arg: str) -> bool:
    """`--config.KEY[=VALUE]` (or absl's `--noconfig.KEY` for a boolean false)."""
    return arg.startswith(("--config.", "--noconfig."))


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the `--config.*` overrides, the other arguments). `--config.KEY VALUE` (a space, not `=`) takes the next
    argument as its value unless that is another flag."""
    overrides, rest = [], []
    argv = list(argv)
    i = 0
    while i < len(argv):
        arg = argv[i]
        if is_override(arg):
            if (
                "=" not in arg
                and arg.startswith("--config.")
                and i + 1 < len(argv)
                and not argv[i + 1].startswith("--")
            ):
                overrides.append(f"{arg}={argv[i + 1]}")
                i += 2
                continue
            overrides.append(arg)
        else:
            rest.append(arg)
        i += 1
    return overrides, rest


def load_config(recipe: str | pathlib.Path, overrides: Sequence[str] = ()):
    """(config, {dotted field: value} of the overrides): the recipe's `get_config()` with `--config.KEY=VALUE`
    overrides applied by ml_collections' own machinery (`config_flags.DEFINE_config_file`, as rpo-train), on a
    flag registry of its own (the process's absl flags are left alone). A field the config lacks is a ValueError
    naming it."""
    from absl import flags
    from ml_collections import config_flags

    recipe = str(recipe)
    if not pathlib.Path(recipe.split(":")[0]).exists():
        raise FileNotFoundError(f"--config {recipe}: no such recipe file")
    registry = flags.FlagValues()
    argv = ["benchmark", f"--config={recipe}", *overrides]
    try:
        config_flags.DEFINE_config_file("config", recipe, flag_values=registry, lock_config=True, sys_argv=argv)
        registry(argv)
    except (KeyError, AttributeError) as e:
        name = str(e).strip("\"' ")
        raise ValueError(
            f"a --config.* override names a field the config does not have: {name!r} (every field "
            "and its default: rpo_jax/train/config/defaults.py)"
        ) from e
    except flags.Error as e:
        raise ValueError(f"--config overrides: {e}") from e
    return registry.config, config_flags.get_override_values(registry["config"])


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None, default_recipe: pathlib.Path):
    """(args, config, overrides) of a benchmark's command line: its own flags (argparse), `--config RECIPE`
    (default `default_recipe`) and the `--config.KEY=VALUE` overrides (`load_config`)."""
    parser.add_argument(
        "--config",
        default=str(default_recipe),
        metavar="RECIPE",
        help=f"{CONFIG_HELP} (default: {display(default_recipe)})",
    )
    argv = sys.argv[1:] if argv is None else list(argv)
    overrides, rest = split_overrides(argv)
    args = parser.parse_args(rest)
    try:
        cfg, given = load_config(args.config, overrides)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    return args, cfg, given


def display(path: pathlib.Path | str) -> str:
    """`path` relative to the repository when it is inside it."""
    try:
        return str(pathlib.Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def with_overrides(cfg, overrides: dict[str, Any]):
    """A copy of `cfg` with dotted fields set (`{"reference_mode": "in_step", "model.lora.rank": 8}`): what a
    benchmark's modes change, each a config of its own."""
    out = copy.deepcopy(cfg)  # (copy_and_resolve_references would fix data.packing's type to its value's)
    with out.unlocked():
        for key, value in overrides.items():
            node = out
            *path, last = key.split(".")
            for p in path:
                node = node[p]
            node[last] = value
    return out


# ------------------------------------------------------------------------------------------------ synthetic data
@dataclasses.dataclass(frozen=True)
class Overheads:
    """Tokens a tokenizer adds around a record's characters: before the prompt (BOS) and after a response (EOS)."""

    prompt: int
    response: int


def demo_tokenizer_path() -> str:
    from rpo_jax.data import demo_paths

    return demo_paths()["tokenizer"]


def token_overheads(tokenizer) -> Overheads:
    """`Overheads` of `tokenizer` for a standard (text) record, measured on a probe through the trainer's
    tokenization (`rpo_jax.data.encode_record`)."""
    from rpo_jax.data import encode_record, parse_record

    record = parse_record({"prompt": "abcdefgh", "responses": ["abcd", "efgh"]}, "k_responses", ("probe", 1))
    prompt, responses = encode_record(record, tokenizer)
    return Overheads(len(prompt) - 8, len(responses[0]) - 4)


def synthetic_records(
    rng: np.random.Generator,
    prompt_lengths: Sequence[int],
    response_lengths: Sequence[Sequence[int]],
    overheads: Overheads,
) -> list[dict]:
    """K-response records (prompt, responses, rewards descending: response 0 the best) whose prompts and
    responses are `prompt_lengths[i]` and `response_lengths[i][k]` tokens (`overheads` included) of random
    characters of `ALPHABET`."""
    letters = np.array(list(ALPHABET))

    def text(n):
        if n < 1:
            raise ValueError(f"a synthetic text needs ≥ 1 character; lengths must exceed the tokenizer's {overheads}")
        return "".join(rng.choice(letters, n))

    out = []
    for p, rs in zip(prompt_lengths, response_lengths, strict=True):
        k = len(rs)
        responses = [text(r - overheads.response) for r in rs]
        while len(set(responses)) < k:  # records need distinct responses (only short ones can collide)
            responses = [text(r - overheads.response) for r in rs]
        rewards = sorted(rng.normal(size=k).round(4).tolist(), reverse=True)
        out.append({"prompt": text(p - overheads.prompt), "responses": responses, "rewards": rewards})
    return out


def write_synthetic(
    path: pathlib.Path, prompt_lengths: Sequence[int], response_lengths: Sequence[Sequence[int]], *, seed: int = 0
) -> pathlib.Path:
    """A JSONL file of `synthetic_records` (token counts for the demo's character tokenizer)."""
    from rpo_jax.train.build.data import load_tokenizer

    records = synthetic_records(
        np.random.default_rng(seed),
        prompt_lengths,
        response_lengths,
        token_overheads(load_tokenizer(demo_tokenizer_path())),
    )
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def uniform_file(
    directory: pathlib.Path, n: int, k: int, prompt_len: int, response_len: int, *, seed: int = 0
) -> pathlib.Path:
    """`n` records of K responses, every prompt `prompt_len` and every response `response_len` tokens."""
    return write_synthetic(
        pathlib.Path(directory) / f"synthetic_{n}x{k}_{prompt_len}+{response_len}.jsonl",
        [prompt_len] * n,
        [[response_len] * k] * n,
        seed=seed,
    )


SYNTHETIC_FIELDS = ("data.train", "data.eval", "data.max_length", "data.max_prompt_length", "model.tokenizer")


def synthetic_config(
    cfg, data_file: pathlib.Path, *, max_length: int, max_prompt_length: int, overrides: dict | None = None
):
    """`cfg` training on `data_file` (`write_synthetic`): the demo's character tokenizer, `data.max_length` /
    `max_prompt_length` the file's (nothing dropped or truncated), no evaluation split, no pairs derived, no
    progress bar. `overrides` (the command line's): a ValueError when they set a field the synthetic file decides
    (use the benchmark's length flags)."""
    reject_synthetic_overrides(overrides or {})
    return with_overrides(
        cfg,
        {
            "data.train": str(data_file),
            "data.eval": "",
            "data.eval_fraction": 0.0,
            "data.pairs": "",
            "data.format": "",
            "data.truncation": "drop",
            "data.max_length": int(max_length),
            "data.max_prompt_length": int(max_prompt_length),
            "model.tokenizer": demo_tokenizer_path(),
            "train.progress_bar": False,
            "train.epochs": 0.0,
        },
    )


def reject_synthetic_overrides(overrides: dict) -> None:
    """A ValueError when the command line's `overrides` set a field the synthetic file decides."""
    clash = sorted(set(overrides) & set(SYNTHETIC_FIELDS))
    if clash:
        raise ValueError(
            f"--config.{clash[0]}: the synthetic file sets {', '.join(SYNTHETIC_FIELDS)}; use the "
            "benchmark's length flags (--prompt-len, --response-len, --k) instead"
        )


def check_lengths(run, prompt_len: int, response_len: int) -> None:
    """A ValueError unless every train example has a `prompt_len`-token prompt and `response_len`-token responses
    (the synthetic file's token counts, through the trainer's tokenization)."""
    for e in run.datasets["train"].examples:
        got = {(p, len(s) - p) for s, p in zip(e.sequences, e.prompt_lengths)}
        if got != {(prompt_len, response_len)}:
            raise ValueError(
                f"synthetic record {e.index}: (prompt, response) tokens {sorted(got)}, expected "
                f"({prompt_len}, {response_len})"
            )


# ------------------------------------------------------------------------------------------------ the trainer's run
def devices_of(count: int):
    """The first `count` local devices (0: all of them)."""
    import jax

    return jax.local_devices() if count <= 0 else jax.local_devices()[:count]


def build_benchmark_run(cfg, workdir: pathlib.Path | str, *, devices=None):
    """The trainer's run for `cfg` as `rpo_jax.train.jobs.preference.train` prepares it: the config validated
    (`rpo_jax.train.config.validation.validate`: the schema's defaults and spellings; one line for a bad value),
    `build_run`, and the reference cache filled when the references are cached (`fill_reference_cache`, under
    `workdir`)."""
    from rpo_jax.train.config.validation import to_config_dict, validate
    from rpo_jax.train.jobs.preference import build_run, fill_reference_cache

    run = build_run(to_config_dict(validate(cfg)), workdir, devices=devices)
    fill_reference_cache(run)
    return run


def trainer_steps(run):
    """(train step, eval step) of `run`: `rpo_jax.train.jobs.preference.run_steps`, the builder's `jitted_steps`
    with the arguments `preference_task` gives it — the programs `rpo-train` runs. tests/benchmarks checks that the
    lowered train step is the trainer's, HLO for HLO."""
    from rpo_jax.train.jobs.preference import run_steps

    return run_steps(run)


def host_batches(run, count: int = 1) -> list[dict[str, np.ndarray]]:
    """The first `count` batches of the train split, from the trainer's iterator (`make_train_iterator` with the
    run's seed and shuffle, this process's rows)."""
    from rpo_jax.data import make_train_iterator
    from rpo_jax.train.runtime.global_batches import local_batch_size

    cfg = run.config
    iterator = make_train_iterator(
        run.datasets["train"], local_batch_size(cfg.data.batch_size, run.mesh), seed=cfg.seed, shuffle=cfg.data.shuffle
    )
    return [next(iterator) for _ in range(count)]


def host_batch(run) -> dict[str, np.ndarray]:
    """The first batch of the train split (`host_batches`)."""
    return host_batches(run)[0]


def step_arguments(run, batch: dict[str, np.ndarray]) -> tuple[dict, tuple]:
    """(inputs, reference parameters) of the train step for a host `batch`: `train_batch` (cached reference
    log-probs added, packed per `config.data.packing`) and `step_reference_params`, as the trainer feeds them."""
    from rpo_jax.train.jobs.preference import step_reference_params, train_batch

    return train_batch(run, batch), step_reference_params(run)


def step_flops(run, inputs: dict) -> float:
    """FLOPs of one train step on `inputs`, counted by the trainer's own `step_flops` (the global batch's shape,
    the in-step references, the score window of padded batches, the scored slots of packed ones where the step
    unembeds those alone)."""
    from rpo_jax.data.packing import scored_tokens
    from rpo_jax.train.jobs.preference import step_flops as trainer_step_flops

    return trainer_step_flops(run, inputs, scored_tokens(inputs))


def layout_text(inputs: dict) -> str:
    """ "padded [B, K, T]" or "packed [R, T]" of a step's inputs."""
    shape = "×".join(str(d) for d in inputs["tokens"].shape)
    return f"{'packed' if 'response_id' in inputs else 'padded'} {shape}"


class CompiledStep:
    """A `WithFrozen` step (`trainer_steps`) compiled ahead of time for one set of arguments: the same lowered
    program the trainer's jit dispatch runs, compiled once (not timed), its buffer plan readable (`memory`).
    Arguments whose layout the executable does not take as they are (int4 bases on the CPU: JAX's ahead-of-time
    call refuses their byte-per-code layout, where jit dispatch converts it) go through the step's own jit
    dispatch instead, as in the trainer (compiled again there, on the first call)."""

    def __init__(self, step, *args):
        self.step = step
        self.compiled = step.lower(*args).compile()
        self.dispatch = False

    def __call__(self, *args):
        if not self.dispatch:
            try:
                return self.compiled(*args, frozen=self.step.frozen)
            except ValueError as e:  # raised before the call: nothing was donated
                if "layouts" not in str(e):
                    raise
                self.dispatch = True
        return self.step(*args)

    def memory(self) -> dict[str, int]:
        return step_memory(self.compiled)


def step_memory(compiled) -> dict[str, int]:
    """Bytes XLA's buffer assignment gives one compiled step: arguments (state, batch, frozen base), outputs,
    temporaries; peak = arguments + outputs + temporaries − donated (aliased) outputs."""
    m = compiled.memory_analysis()
    peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return {"arguments": m.argument_size_in_bytes, "temporaries": m.temp_size_in_bytes, "peak": peak}


def process_peak_memory() -> tuple[float, str]:
    """(GiB, where): the first device's peak bytes in use when it reports them, else the process's peak RSS."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**30, "device"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "RSS"
