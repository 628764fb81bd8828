"""The fit check (`rpo_jax.train.build.fit`): budgets, XLA's memory analysis read into figures, the need of a run
on the CPU (resident set + what its largest program allocates) and on an accelerator, and the one-line refusal."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from rpo_jax.train.build.fit import (
    Capacity,
    DoesNotFit,
    ProgramMemory,
    check_fit,
    memory_capacity,
    program_memory,
    resident_bytes,
    run_need,
)
from rpo_jax.train.config.values import AUTO_MEMORY_FRACTION as AUTO_FRACTION
from rpo_jax.train.config.values import memory_budget_bytes as budget_bytes
from rpo_jax.train.config.values import parse_memory_budget

GiB = 2**30


@pytest.mark.parametrize(
    "setting, expected",
    [
        ("auto", int(AUTO_FRACTION * 10 * GiB)),
        ("0", None),
        (0, None),
        ("0.5", 5 * GiB),
        (0.25, int(2.5 * GiB)),
        ("1", 10 * GiB),
        ("12GB", 12 * 10**9),
        ("1.5GiB", int(1.5 * GiB)),
        ("512 MiB", 512 * 2**20),
        ("1gb", 10**9),
    ],
)
def test_budgets(setting, expected):
    assert budget_bytes(parse_memory_budget(setting), 10 * GiB) == expected


@pytest.mark.parametrize(
    "setting, message",
    [
        ("12", "a number without a unit is a fraction of the memory, in (0, 1]"),
        ("12 apples", "expected 'auto', 0 (no check), a fraction such as 0.8, or a size such as '12GB'"),
        ("-1GB", "expected 'auto', 0 (no check)"),
        ("0.1B", "expected 'auto', 0 (no check)"),
        ("2.5", "a number without a unit is a fraction of the memory"),
        (True, "expected 'auto', 0 (no check)"),
        ([1], "expected 'auto', 0 (no check)"),
    ],
)
def test_bad_budgets_are_one_line_naming_the_key(setting, message):
    with pytest.raises(ValueError) as e:
        parse_memory_budget(setting)
    assert str(e.value).startswith(f"config.train.memory_budget={setting!r}: ") and message in str(e.value)
    assert "\n" not in str(e.value)


def test_memory_analysis_reads_arguments_outputs_and_donation():
    """A [1024, 1024] float32 argument (4 MiB) donated to an output of the same shape: arguments and outputs are
    4 MiB each and the output is aliased; an intermediate that is not fused away is a temporary."""
    x = jnp.ones((1024, 1024), jnp.float32)

    def f(a):
        b = jnp.sin(a) @ a  # a matmul result: a buffer of its own
        return b @ a

    compiled = jax.jit(f, donate_argnums=0).lower(x).compile()
    m = program_memory("f", compiled, resident=7)
    assert m.arguments == 4 * 2**20 and m.outputs == 4 * 2**20 and m.aliased == 4 * 2**20
    assert m.temporaries >= 4 * 2**20  # sin(a) @ a
    assert m.total == m.arguments + m.temporaries + m.code + 7
    assert m.to_allocate == m.temporaries + m.code


def test_need_on_the_cpu_is_the_resident_set_plus_the_largest_allocation():
    programs = [ProgramMemory("a", 100, 10, 10, 50, 5), ProgramMemory("b", 10, 200, 0, 20, 5)]
    host = Capacity(10**9, "host", host=True)
    device = Capacity(10**9, "device", host=False)
    assert run_need(programs, host, resident_now=1000) == 1000 + 225  # b: outputs 200 + temps 20 + code 5
    assert run_need(programs, device) == 235  # b: 10 + 200 + 20 + 5 (a: 100 + 0 + 50 + 5 = 155)
    # a plan (nothing allocated yet): the largest total on top of the process
    assert run_need(programs, host, resident_now=1000, allocated=False) == 1000 + 235
    # 8 devices in the process (simulated CPU devices): each runs the program's per-device buffers, code once
    eight = Capacity(10**9, "host", host=True, devices=8)
    assert run_need(programs, eight, resident_now=1000) == 1000 + 8 * 220 + 5
    assert run_need(programs, eight, resident_now=1000, allocated=False) == 1000 + 8 * 230 + 5


def test_a_run_over_its_budget_stops_with_one_line():
    programs = [ProgramMemory("train step", 2 * GiB, 0, 0, 3 * GiB, 0)]
    capacity = Capacity(8 * GiB, "8.0 GiB per device (test)", host=False)
    assert check_fit(programs, capacity, "auto") == (5 * GiB, int(AUTO_FRACTION * 8 * GiB))
    assert check_fit(programs, capacity, "0") == (5 * GiB, None)
    with pytest.raises(DoesNotFit) as e:
        check_fit(programs, capacity, "1GB", suggestions=["--config.model.remat=full"])
    assert str(e.value) == (
        "the run does not fit in memory: it needs 5.00 GiB (train step: temporaries 3.00 GiB) but "
        "config.train.memory_budget='1GB' allows 0.93 GiB of 8.0 GiB per device (test); settings that lower it: "
        "--config.model.remat=full"
    )


def test_host_capacity_counts_this_process_and_what_is_available():
    capacity = memory_capacity(jax.devices("cpu"))
    assert capacity.host and capacity.bytes >= resident_bytes() > 0
    assert "GiB of host memory" in capacity.what


def test_a_run_over_its_budget_stops_before_step_1_and_writes_nothing(tmp_path, caplog):
    """The trainer's fit check: the train step compiled for the largest batch, the process's need against the
    budget; `memory_budget="100MB"` (below what the process itself holds) stops before the reference cache, the
    checkpoints or the work directory exist; the default budget logs the need and trains."""
    from rpo_jax.train.jobs.preference import train

    from .trainer_testlib import tiny_config

    cfg = tiny_config(tmp_path / "data", **{"train.memory_budget": "100MB", "train.steps": 1})
    with pytest.raises(DoesNotFit, match=r"^the run does not fit in memory: it needs \d+\.\d\d GiB \(train step: "):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    cfg = tiny_config(tmp_path / "data", **{"train.steps": 1, "train.checkpoint_every": 0})
    with caplog.at_level("INFO"):
        train(cfg, tmp_path / "run2")
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("fit check: the run needs"))
    need = float(line.split("needs ")[1].split(" GiB")[0])
    assert need * GiB > resident_bytes() * 0.5  # the process's own memory is part of the need


def test_the_fit_check_compiles_the_eval_step_for_the_eval_splits_largest_batch(tmp_path, caplog):
    """An eval batch 12× the train batch: the eval step is the run's largest program, and the fit check says so
    (its temporaries are what the log line names), before step 1 — not when the first evaluation comes."""
    from rpo_jax.train.jobs.preference import build_run, check_memory, run_steps

    from .trainer_testlib import tiny_config

    cfg = tiny_config(tmp_path / "data", **{"data.eval_batch_size": 96, "train.steps": 1})
    run = build_run(cfg, tmp_path / "run")
    with caplog.at_level("INFO"):
        check_memory(run, run_steps(run))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fit check:")]
    assert "and the eval step for (96, 4, 64) tokens" in lines[0], lines[0]  # K = 4
    assert "(eval step: temporaries" in lines[1], lines[1]
    cfg = tiny_config(tmp_path / "data", **{"data.eval_batch_size": 96, "train.steps": 1, "train.memory_budget": "1B"})
    with pytest.raises(DoesNotFit, match=r"\(eval step: "):
        check_memory(build_run(cfg, tmp_path / "run2"), run_steps(run))


def test_an_online_fit_check_compiles_the_evaluations_sampler_when_it_samples_more_rows(tmp_path, caplog):
    """Online evaluation samples one response to each of `online.eval_prompts` (200) in one call, more rows than
    an iteration's 8 prompts × 2 samples: the fit check compiles the sampler for those rows too."""
    from rpo_jax.train.jobs import online

    from .test_online import online_config
    from .trainer_testlib import TINY_MODEL

    overrides = {
        "model.path": "",
        "model.init": dict(TINY_MODEL),
        "online.prompts_per_iteration": 8,
        "online.num_samples": 2,
        "data.batch_size": 8,
        "train.memory_budget": "1B",
    }
    for eval_prompts, compiled in ((200, "and the eval sampler for (200, 32) tokens"), (16, "(16, 32) tokens (the")):
        caplog.clear()
        with caplog.at_level("INFO"), pytest.raises(DoesNotFit):
            online.train_online(online_config("", **overrides, **{"online.eval_prompts": eval_prompts}), tmp_path)
        line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("fit check: compiling"))
        assert line.startswith(
            "fit check: compiling the update step for (8, 2, 52) tokens and the sampler for (16, 32)"
        )
        assert compiled in line, line  # 16 evaluation rows: the iteration's sampler program covers them


def test_the_fit_check_compiles_the_train_programs_of_the_first_steps(tmp_path, caplog):
    """Packed batches of several shapes (`data.packing=True`, rows chosen per batch): the fit check compiles the
    train step once for each distinct input of the run's steps — the shapes `train_batch` gives each batch of the
    run's iterator, in order of first use; not the split's largest batch, since the run is shorter than
    `FIT_LOOKAHEAD_STEPS` — and the steps then run without a single backend compilation."""
    from jax._src.dispatch import BACKEND_COMPILE_EVENT

    from rpo_jax.train.build.data import train_iterator
    from rpo_jax.train.jobs import preference

    from .trainer_testlib import tiny_config

    cfg = tiny_config(tmp_path / "data", **{"data.packing": True, "train.steps": 6})
    run = preference.build_run(cfg, tmp_path / "run")
    train_step, eval_step = preference.run_steps(run)
    with caplog.at_level("INFO"):
        preference.check_memory(run, (train_step, eval_step))
    preference.fill_reference_cache(run)
    iterator = train_iterator(run.datasets["train"], run.config, run.mesh)
    batches = [preference.train_batch(run, next(iterator)) for _ in range(cfg.train.steps)]
    shapes = list(dict.fromkeys(tuple(b["tokens"].shape) for b in batches))
    assert len(shapes) >= 2 and all(len(s) == 2 for s in shapes), shapes  # packed rows of several shapes
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("fit check: compiling"))
    expected = f"the train step for {', '.join(map(str, shapes))} tokens and the eval step for ("
    assert expected in line and line.endswith("(the train batches of the first 6 steps, the largest eval batch)")
    compiles = []

    def count(event, duration, **kwargs):
        if event == BACKEND_COMPILE_EVENT:
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        state = run.state
        for batch in batches:
            state, _ = train_step(state, batch, preference.step_reference_params(run))
        jax.block_until_ready(state)
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    assert compiles == []
