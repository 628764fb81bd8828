"""`rpo-plan`: compile a recipe's programs for a Cloud TPU slice ahead of time, on a machine without TPUs, and
report per chip what they need (HBM), compute (FLOPs) and communicate (collectives).

    rpo-plan --config configs/llama3_1_8b_v5p.py --topology v5p-64 [--config.x=y ...] [--responses K]
    rpo-plan --config configs/llama3_1_8b_v5p.py --topology v5p-64 --search [--search-limit 2]

The slice's devices come from libtpu's topology description (`jax.experimental.topologies.get_topology_desc`,
the megacore chip config on v4/v5p so that one device is one chip); the programs are the trainer's own, built by
the one program builder (`rpo_jax.train.build.plans.build_programs`) the trainer uses, lowered with abstract
arguments (`jax.ShapeDtypeStruct` with `NamedSharding`: nothing is loaded or allocated) and compiled by XLA:TPU.
Which programs depends on `config.mode`:

- preference: the train step, the eval step when the config evaluates, the reference scorers when reference
  log-probs are cached; the global batch is data.batch_size × K × data.max_length (K = `--responses`, the
  responses per example of the data, default 2; data.max_length is the largest length bucket), eval batches
  data.eval_batch_size × K × data.max_length; `model.score_window = "auto"` is planned at its worst case (the
  head on every position) since the data's longest response is not known here;
- online: the update step (data.batch_size prompts × online.num_samples samples of data.max_prompt_length +
  online.max_new_tokens tokens), the sampler (online.prompts_per_iteration × num_samples prompts, and the
  held-out prompts when the run evaluates) and the scorers of the samples;
- reward_model: the train step and eval step on pairs of data.max_length tokens.

`--topology cpu` (or `gpu` on a machine with GPUs) plans for this machine instead: the same programs compiled
by its own XLA backend, and the run's need — as the trainer's fit check before step 1 computes it
(`rpo_jax.train.build.fit`: on the CPU the process's memory now plus every array and the largest program's
temporaries) — against `config.train.memory_budget` of what the machine has.

`--search`: instead of the recipe's own mesh (data / fsdp / tensor / context), remat policy and micro-batches,
search them (`rpo_jax.train.plan.search`: candidates rejected by divisibility and by a memory lower bound before
anything is compiled, at most `--search-limit` of the rest compiled) and print the ones that fit ranked by
estimated step time, with the `--config.*` overrides that select each; the best one's whole report first. Exit
status 0 when one fits, 1 when none of those compiled does.

Exit status: 0 when every program fits, 1 when one does not ("does not fit: needs X GiB of Y GiB per chip on
TOPOLOGY"; XLA's compile-time out-of-memory error is the ground truth), 2 for bad usage (an unknown topology, a
bad config) with one line on stderr.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import jax
from absl import flags
from ml_collections import config_flags

from rpo_jax.models.attention import target_backend
from rpo_jax.train.build.fit import memory_capacity, run_need
from rpo_jax.train.build.plans import build_programs
from rpo_jax.train.cli.common import dashed_flags, help_text, unknown_field_error
from rpo_jax.train.config.validation import validate
from rpo_jax.train.config.values import memory_budget_bytes
from rpo_jax.train.plan.compile import DoesNotFit, compile_program
from rpo_jax.train.plan.report import report, report_local
from rpo_jax.train.plan.search import ranked, search, table
from rpo_jax.train.plan.slices import GiB, parse_slice, slice_devices

#: `--topology` values that plan for this machine's own devices instead of a TPU slice
LOCAL_TARGETS = ("cpu", "gpu")


# ------------------------------------------------------------------------------------------------ command line
def _flag_values(argv: Sequence[str], parse: bool = True) -> flags.FlagValues:
    """rpo-plan's flags, parsed from `argv` (program name first; multi-word flags spelled with dashes)."""
    values = flags.FlagValues()
    # sys_argv: config_flags reads the overrides to register from it (else from sys.argv, which is not `argv`
    # when rpo-plan runs in-process)
    config_flags.DEFINE_config_file(
        "config", None, "Recipe file (configs/NAME.py).", flag_values=values, lock_config=True, sys_argv=list(argv)
    )
    flags.DEFINE_string(
        "topology",
        None,
        "Cloud TPU accelerator type: v5p-64, v4-32, v5litepod-16 / v5e-16, v6e-8, ...; or cpu / gpu: this "
        "machine's own devices (its memory, config.train.memory_budget)",
        flag_values=values,
    )
    flags.DEFINE_integer(
        "responses", 2, "K: responses per example in the data (2 for pairs; mode=preference).", flag_values=values
    )
    flags.DEFINE_bool(
        "rewards",
        False,
        "The data carries per-response scores (they reach the step's metrics even when the loss does not use them).",
        flag_values=values,
    )
    flags.DEFINE_string(
        "dump_hlo", "", "A directory: write each program's compiled HLO text there.", flag_values=values
    )
    flags.DEFINE_bool(
        "search",
        False,
        "Search the mesh, remat policy and micro-batches that fit the slice, ranked by estimated step time.",
        flag_values=values,
    )
    flags.DEFINE_integer(
        "search_limit", 2, "--search: at most this many candidates compiled (after pruning).", flag_values=values
    )
    if not parse:
        return values
    try:
        values(dashed_flags(list(argv), {"dump_hlo", "search_limit"}))
    except (KeyError, AttributeError) as e:  # an override naming no field of the config
        raise unknown_field_error(e) from e
    if values.config is None or not values.topology:
        raise ValueError("--config and --topology are required (rpo-plan --config CONFIG --topology v5p-64)")
    if values.responses < 1:
        raise ValueError(f"--responses={values.responses}: expected a positive number")
    if values.search and values.search_limit < 1:
        raise ValueError(f"--search_limit={values.search_limit}: expected a positive number")
    if values.search and values.topology in LOCAL_TARGETS:
        raise ValueError(f"--search plans a TPU slice (--topology v5p-64, ...), not --topology={values.topology}")
    return values


def run(argv: Sequence[str]) -> int:
    """rpo-plan's body: the exit status (0 fits, 1 does not fit, 2 bad usage)."""
    try:
        values = _flag_values(argv)
        if values.topology in LOCAL_TARGETS:
            return run_local(values)
        cfg, slc = values.config, parse_slice(values.topology)
        devices = slice_devices(slc)
    except (ValueError, OSError, KeyError, AttributeError, TypeError, flags.Error) as e:
        print(f"rpo-plan: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    with target_backend(devices[0].platform, len(devices)):  # "auto" attention as on the slice, not this host
        return run_slice(argv, values, cfg, slc, devices)


def run_slice(argv: Sequence[str], values: flags.FlagValues, cfg, slc, devices) -> int:
    """rpo-plan for a TPU slice (`run`'s body there): the plan's programs compiled, reported, the exit status."""
    try:
        if values.search:
            return run_search(argv, values, slc, devices)
        plan = build_programs(cfg, devices, values.responses, rewards=values.rewards)
    except (ValueError, OSError, KeyError, AttributeError, TypeError, flags.Error) as e:
        print(f"rpo-plan: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    compiled, failures = [], []
    for program in plan.programs:
        try:
            c = compile_program(program, slc.num_chips, values.dump_hlo)
        except DoesNotFit as e:
            failures.append(e)
            continue
        compiled.append(c)
        if c.total > slc.chip.hbm_bytes:
            failures.append(DoesNotFit(c.name, c.total, slc.chip.hbm_bytes))
    if compiled:
        print(report(plan, compiled, slc, cfg))
    for e in failures:
        print(
            f"rpo-plan: {e.program}: does not fit: needs {e.needed / GiB:.1f} GiB of {e.capacity / GiB:.1f} "
            f"GiB per chip on {slc.accelerator}"
        )
    return 1 if failures else 0


def run_search(argv: Sequence[str], values: flags.FlagValues, slc, devices) -> int:
    """`rpo-plan --search`: the candidates that fit `slc`, ranked (`rpo_jax.train.plan.search`); the best one's
    report, then the table. Each candidate's config is the command line's with its overrides added."""

    def config_for(overrides: Sequence[str]):
        return _flag_values([*argv, *overrides]).config

    pruned, results = search(
        config_for,
        slc,
        devices,
        values.responses,
        values.rewards,
        values.search_limit,
        progress=lambda line: print(line, flush=True),
    )
    best = ranked(results)
    if best:
        print(report(best[0].plan, best[0].compiled, slc, config_for(best[0].candidate.overrides)))
    print(table(results, slc))
    return 0 if best else 1


def local_devices(platform: str) -> list:
    """This machine's devices of `platform` ("cpu", "gpu"); a ValueError when it has none."""
    try:
        return jax.devices(platform)
    except RuntimeError:
        raise ValueError(f"--topology={platform}: this machine has no {platform.upper()} device") from None


def run_local(values: flags.FlagValues) -> int:
    """rpo-plan for this machine (`--topology cpu` / `gpu`): the programs compiled by its own XLA backend, the run's
    need against `config.train.memory_budget` as the trainer's fit check computes it (`rpo_jax.train.build.fit`),
    without the TPU figures (FLOP peak, ICI). Raises ValueError for bad usage."""
    cfg = values.config
    devices = local_devices(values.topology)
    plan = build_programs(cfg, devices, values.responses, rewards=values.rewards)
    capacity = memory_capacity(devices)
    compiled = [compile_program(program, len(devices), values.dump_hlo) for program in plan.programs]
    need = run_need(compiled, capacity, allocated=False)
    budget = memory_budget_bytes(validate(cfg).train.memory_budget, capacity.bytes)
    print(report_local(plan, compiled, capacity, need, budget, values.topology, cfg))
    return 1 if budget is not None and need > budget else 0


def main(argv: Sequence[str] | None = None) -> None:
    """`rpo-plan` (`--help`: what it does and its flags)."""
    argv = list(sys.argv if argv is None else argv)
    if {"-h", "--help"} & set(argv[1:]):
        values = _flag_values([argv[0]], parse=False)
        print(help_text("rpo-plan", __doc__, values, __name__), end="")
        sys.exit(0)
    sys.exit(run(argv))
