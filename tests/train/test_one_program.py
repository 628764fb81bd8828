"""One program builder: `rpo-plan` (`build_programs`, abstract arguments) and the trainer (`build_run` →
`preference_task`, real arrays) compile the same programs — the same reference layout, and for every argument
of every compiled program (train step, eval step, cache-fill scorers, the frozen rest) the same tree structure,
shapes, dtypes, shardings and donation.

The planned batch is the worst case (data.max_length, padded); the trainer's is the data's length bucket, so for
the batch argument only the structure, dtypes and shardings are compared (and the shapes too when the trainer's
bucket is data.max_length). With packing on the trainer's rows are packed while rpo-plan plans padded rows: the
batch is left out there, everything else is compared.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib

import jax
import numpy as np
import pytest

from rpo_jax.data import make_eval_batches, make_train_iterator
from rpo_jax.data.reward_pairs import pair_batch
from rpo_jax.train.build.data import load_tokenizer, tokenizer_path
from rpo_jax.train.build.plans import build_programs
from rpo_jax.train.build.programs import (
    ReferenceLayout,
    Scoring,
    Weights,
    online_layout,
    online_update_step,
    reference_layout,
    reference_sync_of,
    reward_steps,
    scorer,
)
from rpo_jax.train.build.state import build_loss
from rpo_jax.train.jobs import online, preference, reward_model
from rpo_jax.train.runtime.global_batches import local_batch_size, to_global

from .trainer_testlib import load_recipe, save_tiny_base, set_fields, tiny_config

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"


def signature(tree) -> dict[str, tuple]:
    """Path → (shape, dtype, sharding) of every leaf (arrays or ShapeDtypeStructs)."""
    return {
        jax.tree_util.keystr(path): (tuple(x.shape), str(x.dtype), x.sharding)
        for path, x in jax.tree_util.tree_leaves_with_path(tree)
    }


def donation(program, args) -> dict[str, bool]:
    """Path → donated, for every leaf argument of `program` lowered with `args` (the frozen rest included)."""
    info = program.lower(*args).args_info
    leaves = jax.tree_util.tree_leaves_with_path(info, is_leaf=lambda x: isinstance(x, jax.stages.ArgInfo))
    return {jax.tree_util.keystr(path): a.donated for path, a in leaves}


def assert_same_program(name: str, trainer: tuple, planned: tuple, *, batch: str) -> None:
    """`trainer` and `planned` are (program, args); `batch` is "full" (compare shapes), "layout" (structure,
    dtypes and shardings) or "skip" (packed rows against padded plans)."""
    (t_prog, t_args), (p_prog, p_args) = trainer, planned
    assert len(t_args) == len(p_args), name
    for i, (t, p) in enumerate(zip(t_args, p_args)):
        if i == 1 and batch != "full" and name != "scorer":
            if batch == "layout":
                t_sig, p_sig = signature(t), signature(p)
                assert sorted(t_sig) == sorted(p_sig), f"{name}: batch keys"
                assert {k: v[1:] for k, v in t_sig.items()} == {k: v[1:] for k, v in p_sig.items()}, f"{name}: batch"
            continue
        assert jax.tree.structure(t) == jax.tree.structure(p), f"{name}: argument {i} structure"
        assert signature(t) == signature(p), f"{name}: argument {i}"
    assert signature(t_prog.frozen) == signature(p_prog.frozen), f"{name}: the frozen rest"
    t_don, p_don = donation(t_prog, t_args), donation(p_prog, p_args)
    if batch != "full":  # the batch's leaves are compared above; donation: none of them is donated in either
        t_don = {k: v for k, v in t_don.items() if not k.startswith("[0][1]")}
        p_don = {k: v for k, v in p_don.items() if not k.startswith("[0][1]")}
    assert t_don == p_don, f"{name}: donation"


def trainer_programs(run) -> dict[str, tuple]:
    """The programs the trainer compiles for `run`, with the arguments of their first call."""
    train_step, eval_step = preference.run_steps(run)
    cfg = run.config
    host = next(
        make_train_iterator(
            run.datasets["train"],
            local_batch_size(cfg.data.batch_size, run.mesh),
            seed=cfg.seed,
            shuffle=cfg.data.shuffle,
        )
    )
    eval_host = next(make_eval_batches(run.datasets["eval"], local_batch_size(cfg.data.eval_batch_size, run.mesh)))
    preference.fill_reference_cache(run)
    out = {
        "train step": (
            train_step,
            (run.state, preference.train_batch(run, host), preference.step_reference_params(run)),
        )
    }
    out["eval step"] = (
        eval_step,
        preference.eval_arguments(run, run.state, preference.device_batch(run, eval_host, "eval")),
    )
    if run.layout.scoring is Scoring.CACHED:
        for i, ref in enumerate(run.references):
            params = run.state["params"] if ref.params is None else ref.params
            out[f"reference {i} scorer (cache fill)"] = (
                scorer(run.config, run, ref.graphdef, ref.rest, run.score_window),
                (params, None),
            )
    return out


#: unpaired records from the demo's: each record's best and worst response, desirable and undesirable, file order
UNPAIRED = {"data.pairs": "best_vs_worst", "data.unpair": True, "data.shuffle": False}

#: quickstart variants: (overrides, the reference layout expected: scoring, the primary's weights)
VARIANTS = {
    "quickstart": ({}, Scoring.CACHED, Weights.OWN),
    "in_step": ({"reference_mode": "in_step"}, Scoring.IN_STEP, Weights.OWN),
    "tr_dpo_auto": ({"reference_sync.every": 2}, Scoring.IN_STEP, Weights.TRAIN_STATE),
    "iterated_in_step": ({"reference_mode": "in_step", "train.iterations": 2}, Scoring.IN_STEP, Weights.TRAIN_STATE),
    "lora": ({"model.lora.rank": 4}, Scoring.CACHED, Weights.POLICY_BASE),
    "lora_in_step": ({"model.lora.rank": 4, "reference_mode": "in_step"}, Scoring.IN_STEP, Weights.POLICY_BASE),
    "lora_tr_dpo": ({"model.lora.rank": 4, "reference_sync.every": 2}, Scoring.IN_STEP, Weights.TRAIN_STATE),
    "qlora": (
        {"model.lora.rank": 4, "model.lora.base_dtype": "int8", "reference_mode": "in_step"},
        Scoring.IN_STEP,
        Weights.POLICY_BASE,
    ),
    "packing_on": ({"data.packing": True, "reference_mode": "in_step"}, Scoring.IN_STEP, Weights.OWN),
    "simpo_reference_free": (
        {"loss.name": "simpo", "loss.hparams": {"beta": 2.0, "gamma": 0.5}},
        Scoring.NONE,
        Weights.OWN,
    ),
    # TRL's other trainers: KTO (unpaired rows with mismatched completions, K = 2, labels), BCO (K = 1, its running
    # moments in the train state), ORPO (every position scored for its prompt + response NLL; no reference)
    "kto": ({**UNPAIRED, "loss.name": "kto", "loss.hparams": {"beta": 0.1}}, Scoring.CACHED, Weights.OWN),
    "kto_in_step_lora": (
        {
            **UNPAIRED,
            "loss.name": "kto",
            "loss.hparams": {"beta": 0.1},
            "reference_mode": "in_step",
            "model.lora.rank": 4,
        },
        Scoring.IN_STEP,
        Weights.POLICY_BASE,
    ),
    "bco_micro_batches": (
        {**UNPAIRED, "loss.name": "bco", "loss.hparams": {"beta": 0.1}, "data.micro_batches": 2},
        Scoring.CACHED,
        Weights.OWN,
    ),
    "orpo": ({"loss.name": "orpo", "loss.hparams": {"beta": 0.1}}, Scoring.NONE, Weights.OWN),
}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return save_tiny_base(tmp_path_factory.mktemp("one_program"))


def variant_config(root: pathlib.Path, overrides: dict):
    cfg = tiny_config(root / "data", **{"model.dtype": "float32", "data.max_length": 64, "data.max_prompt_length": 32})
    return set_fields(cfg, overrides)


def plan_config(run, root: pathlib.Path, overrides: dict):
    """The variant's config as rpo-plan reads it: the random init's vocabulary stated (the trainer takes it from
    the tokenizer, which the planner does not load)."""
    cfg = variant_config(root, overrides)
    cfg.model.init = {**cfg.model.init, "vocab_size": run.model_config.vocab_size}
    return cfg


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_plan_and_the_trainer_compile_the_same_programs(variant, tiny_root, tmp_path):
    overrides, scoring, weights = VARIANTS[variant]
    cfg = variant_config(tiny_root, overrides)
    run = preference.build_run(cfg, tmp_path / "run")
    assert (run.layout.scoring, run.layout.primary) == (scoring, weights)
    plan = build_programs(
        plan_config(run, tiny_root, overrides),
        jax.devices(),
        responses=run.datasets["train"].k_max,
        rewards=run.datasets["train"].has_rewards,
    )
    assert plan.layout == run.layout
    assert ("reference" in plan.programs[0].args[0]) == (weights is Weights.TRAIN_STATE)
    planned = {p.name: (p.jitted, p.args) for p in plan.programs}
    trained = trainer_programs(run)
    assert sorted(planned) == sorted(trained)
    bucket_is_max = run.datasets["train"].max_length == cfg.data.max_length
    batch = "skip" if run.packing is not None else ("full" if bucket_is_max else "layout")
    for name in planned:
        if name.startswith("reference"):  # a scorer: parameters and the frozen rest (the batch is the data's)
            (t_prog, (t_params, _)), (p_prog, (p_params, _)) = trained[name], planned[name]
            assert signature(t_params) == signature(p_params), name
            assert signature(t_prog.frozen) == signature(p_prog.frozen), name
            continue
        assert_same_program(name, trained[name], planned[name], batch=batch)
    # the trainer runs exactly these programs: its real first step on CPU
    state, metrics = trained["train step"][0](*trained["train step"][1])
    assert jax.numpy.isfinite(metrics["loss"])


def test_mrpo_plans_both_references(tiny_root, tmp_path):
    """MRPO (R = 2: the initial policy and a second checkpoint) in the step: both references are arguments of the
    train step, with their own parameters, in the plan as in the trainer."""
    overrides = {
        "loss.name": "mrpo",
        "loss.hparams": {"beta": 0.1},
        "references": [{"path": "", "tokenizer": ""}, {"path": str(tiny_root / "base"), "tokenizer": ""}],
        "reference_mode": "in_step",
        "model.tokenizer": str(tiny_root / "base"),
    }
    cfg = variant_config(tiny_root, overrides)
    run = preference.build_run(cfg, tmp_path / "run")
    plan = build_programs(
        plan_config(run, tiny_root, overrides),
        jax.devices(),
        responses=run.datasets["train"].k_max,
        rewards=run.datasets["train"].has_rewards,
    )
    assert plan.layout == run.layout and plan.layout.count == 2
    trained = trainer_programs(run)
    planned = {p.name: (p.jitted, p.args) for p in plan.programs}
    bucket_is_max = run.datasets["train"].max_length == cfg.data.max_length
    for name in planned:
        assert_same_program(name, trained[name], planned[name], batch="full" if bucket_is_max else "layout")


def recipes() -> list[pathlib.Path]:
    return sorted(p for p in CONFIGS.glob("*.py"))


def load(path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_in_step_references_of_another_tokenizer_are_refused_by_the_plan_and_the_trainer(tiny_root, tmp_path):
    """The in-step step scores the policy's token ids: a reference with its own tokenizer is refused, in one place
    (`reference_layout`), with the same line by rpo-plan and by the trainer, before any reference is loaded."""
    overrides = {
        "loss.name": "mrpo",
        "loss.hparams": {"beta": 0.1},
        "references": [{"path": ""}, {"path": str(tiny_root / "base"), "tokenizer": str(tiny_root / "other")}],
        "reference_mode": "in_step",
    }
    message = "reference_mode='in_step' needs references that share the policy's tokenizer; use 'cache'"
    with pytest.raises(ValueError, match=message):
        preference.build_run(variant_config(tiny_root, overrides), tmp_path / "run")
    cfg = variant_config(tiny_root, overrides)
    cfg.model.init = {**cfg.model.init, "vocab_size": 64}
    with pytest.raises(ValueError, match=message):
        build_programs(cfg, jax.devices())


def is_demo_export(path: str) -> bool:
    return path.startswith("runs/") and path.endswith("/export")


def demo_export_architecture(path: str, tmp_path: pathlib.Path) -> str:
    """The architecture file of `runs/NAME/export`: recipe NAME's random init with the vocabulary of its
    tokenizer (what that run exports)."""
    source = load(CONFIGS / f"{path.split('/')[1]}.py")
    fields = {"vocab_size": len(load_tokenizer(tokenizer_path(source))), **dict(source.model.init)}
    arch = tmp_path / f"{path.split('/')[1]}.json"
    arch.write_text(json.dumps(fields))
    return str(arch)


def plannable(cfg, tmp_path: pathlib.Path):
    """`cfg` as rpo-plan can read it without weights, or None for a hub id without an architecture file (which
    rpo-plan refuses, tested in test_plan.py): a random init states its vocabulary (the demo tokenizer's, which
    the trainer takes from the tokenizer); a model that is an earlier demo run's export (`runs/NAME/export`) is
    recipe NAME's random init, written as its architecture file."""
    path = cfg.model.path
    if is_demo_export(path):
        cfg.model.architecture = demo_export_architecture(path, tmp_path)
        cfg.model.tokenizer = tokenizer_path(load(CONFIGS / f"{path.split('/')[1]}.py"))
    elif path and not cfg.model.architecture and not pathlib.Path(path).is_dir():
        return None
    elif not path and "vocab_size" not in cfg.model.init:
        cfg.model.init = {**cfg.model.init, "vocab_size": len(load_tokenizer(tokenizer_path(cfg)))}
    references = [dict(r) for r in cfg.references]
    for r in references:
        if is_demo_export(r.get("path", "")):
            r["architecture"] = demo_export_architecture(r["path"], tmp_path)
    cfg.references = references
    cfg.mesh = {"data": 1, "fsdp": 1, "tensor": 1}
    cfg.data.batch_size, cfg.data.eval_batch_size, cfg.data.micro_batches = 1, 1, 1
    if build_loss(cfg).spec.requires_kl_logps:  # kto: a record's mismatched completion is another record's
        cfg.data.batch_size = 2
    cfg.data.max_length = 32
    if cfg.mode == "online":
        cfg.online.prompts_per_iteration, cfg.online.max_new_tokens = 1, 8
        cfg.data.max_prompt_length = 16
    return cfg


def expected_layouts(cfg):
    """(reference_sync.every, the layout the trainer decides) for a recipe: preference with and without TR-DPO
    (`reference_layout`), online (`online_layout`), a reward model (none)."""
    loss_fn = build_loss(cfg)
    if cfg.mode == "online":
        return [(0, online_layout(cfg, loss_fn.spec.requires_reference))]
    if cfg.mode == "reward_model":
        return [(0, ReferenceLayout(Scoring.NONE, Weights.OWN, 0))]
    syncs = (0, 8) if loss_fn.spec.requires_reference and cfg.reference_mode != "cache" else (0,)
    out = []
    for sync in syncs:
        cfg.reference_sync.every = sync
        try:
            out.append((sync, reference_layout(cfg, loss_fn.spec.requires_reference, reference_sync_of(cfg))))
        except ValueError as refusal:  # in the step with a reference of another tokenizer: refused by both
            out.append((sync, refusal))
    return out


def test_every_recipe_plans_the_trainers_reference_layout(tmp_path):
    """Every recipe in configs/ (every mode), abstractly from its architecture (no weights read), on one CPU
    device: `build_programs` lowers its first program with the layout the trainer decides — the primary
    reference in the train state exactly when it moves or resets."""
    checked = set()
    for path in recipes():
        cfg = plannable(load(path), tmp_path)
        if cfg is None:
            continue
        for sync, expected in expected_layouts(cfg):
            cfg.reference_sync.every = sync
            if isinstance(expected, ValueError):
                with pytest.raises(ValueError, match=str(expected).replace("(", r"\(").replace(")", r"\)")):
                    build_programs(cfg, jax.devices()[:1])
                continue
            plan = build_programs(cfg, jax.devices()[:1])
            assert plan.layout == expected and plan.mode == cfg.mode, (path.name, sync)
            state = plan.programs[0].args[0]
            assert ("reference" in state) == expected.in_state, (path.name, sync)
            plan.programs[0].jitted.lower(*plan.programs[0].args)
            checked.add(path.name)
    hub_ids_without_architecture = {"smollm2.py", "smollm2_demo.py"} - {p.name for p in recipes() if p.name in checked}
    assert checked == {p.name for p in recipes()} - hub_ids_without_architecture


# ------------------------------------------------------------------------------------------------ online
#: online variants: (overrides, the reference layout expected: scoring, the primary's weights, count)
ONLINE_VARIANTS = {
    "initial": ({}, Scoring.CACHED, Weights.OWN, 1),
    "previous_iterate": ({"online.reference": "previous_iterate"}, Scoring.CACHED, Weights.POLICY, 1),
    "current_rloo": ({"online.reference": "current", "loss.name": "rloo"}, Scoring.NONE, Weights.OWN, 0),
    "lora_base": ({"model.lora.rank": 4}, Scoring.CACHED, Weights.POLICY_BASE, 1),
    "packing_on": ({"data.packing": True}, Scoring.CACHED, Weights.OWN, 1),
    # MRPO: the initial policy and a second checkpoint (config.references[1], scored by its own scorer)
    "mrpo_extra_reference": (
        {"loss.name": "mrpo", "loss.hparams": {"beta": 0.1}, "references": "initial + base"},
        Scoring.CACHED,
        Weights.OWN,
        2,
    ),
}


def online_variant_config(root: pathlib.Path, overrides: dict):
    """configs/online_demo.py on the tiny base checkpoint: 8 prompts × 2 samples per iteration, updates on all 8
    prompts, one sample to each of 8 held-out prompts."""
    c = load_recipe("online_demo")
    c.model.path = str(root / "base")
    c.model.dtype = "float32"
    c.metrics.tensorboard = False
    c.train.progress_bar = False
    c.online.update({"iterations": 1, "prompts_per_iteration": 8, "num_samples": 2, "max_new_tokens": 8})
    c.online.update({"updates_per_iteration": 1, "eval_prompts": 8})
    c.data.batch_size = 8
    if overrides.get("references") == "initial + base":
        overrides = {**overrides, "references": [{"path": ""}, {"path": str(root / "base")}]}
    return set_fields(c, overrides)


def online_trainer_programs(run) -> dict[str, tuple]:
    """The programs an online run compiles, with the arguments of their first call (iteration 0)."""
    params = run.state["params"]
    oc = run.config.online
    train_ids = [
        run.prompt_ids["train"][i]
        for i in online.prompt_order(len(run.prompts["train"]), 0, oc.prompts_per_iteration, run.config.seed)
    ]
    flat = [p for p in train_ids for _ in range(oc.num_samples)]
    tokens, mask = online.left_pad(flat, run.prompt_width, run.pad_id)
    inputs = online.global_batch(run, {"tokens": tokens, "mask": mask})
    key = online.iteration_key(run, 0)
    batch, _ = online.iteration_batch(run, params, 0)
    samples = online.global_batch(run, {k: v for k, v in batch.items() if k != "ref_logps"})
    minibatch = next(online.minibatches(batch, run.config.data.batch_size, 1))
    out = {
        "update step": (
            online_update_step(run.config, run, run.loss_fn),
            (run.state, online.global_batch(run, minibatch, micro_batches=run.config.data.micro_batches)),
        ),
        "sampler": (run.sampler, (params, inputs["tokens"], inputs["mask"], key)),
        "policy scorer (samples)": (run.policy_scorer, (params, samples)),
    }
    if run.base_scorer is not None:
        out["base scorer (samples)"] = (run.base_scorer, (params, samples))
    for i, (ref_scorer, ref_params) in enumerate(run.extra_references, start=1):
        out[f"reference {i} scorer (samples)"] = (ref_scorer, (ref_params, samples))
    eval_ids = run.prompt_ids["eval"][: oc.eval_prompts]
    eval_tokens, eval_mask = online.left_pad(eval_ids, run.prompt_width, run.pad_id)
    eval_inputs = online.global_batch(run, {"tokens": eval_tokens, "mask": eval_mask})
    out["sampler (eval prompts)"] = (run.sampler, (params, eval_inputs["tokens"], eval_inputs["mask"], key))
    eval_batch, _ = online.collect(run, params, np.arange(len(eval_ids)), "eval", 1, key)
    out["policy scorer (eval samples)"] = (run.policy_scorer, (params, online.global_batch(run, eval_batch)))
    return out


@pytest.mark.parametrize("variant", sorted(ONLINE_VARIANTS))
def test_online_plan_and_trainer_compile_the_same_programs(variant, tiny_root):
    """`rpo-plan` on an online recipe plans what `build_online_run` / `online_task` compile: the update step, the
    sampler (an iteration's prompts, the held-out prompts), the scorers of the samples; same arguments (structure,
    shapes, dtypes, shardings; the sampler's key: shape and dtype), frozen rest and donation."""
    overrides, scoring, weights, count = ONLINE_VARIANTS[variant]
    cfg = online_variant_config(tiny_root, overrides)
    run = online.build_online_run(cfg)
    assert run.layout == (scoring, weights, count, None)
    plan = build_programs(online_variant_config(tiny_root, overrides), jax.devices())
    assert plan.layout == run.layout and plan.mode == "online"
    planned = {p.name: (p.jitted, p.args) for p in plan.programs}
    trained = online_trainer_programs(run)
    assert sorted(planned) == sorted(trained)
    packed = run.packing is not None
    for name in planned:
        if name.startswith("sampler"):
            (t_prog, t_args), (p_prog, p_args) = trained[name], planned[name]
            assert [signature(a) for a in t_args[:3]] == [signature(a) for a in p_args[:3]], name
            assert (t_args[3].shape, t_args[3].dtype) == (p_args[3].shape, p_args[3].dtype), name
            assert signature(t_prog.frozen) == signature(p_prog.frozen), name
            continue
        if "scorer" in name:  # params and the frozen rest; the samples: all but the shapes (padded to the longest)
            (t_prog, (t_params, t_batch)), (p_prog, (p_params, p_batch)) = trained[name], planned[name]
            assert signature(t_params) == signature(p_params), name
            assert signature(t_prog.frozen) == signature(p_prog.frozen), name
            if not packed:
                assert signature(t_batch) == signature(p_batch), name
            continue
        assert_same_program(name, trained[name], planned[name], batch="skip" if packed else "full")
    state, metrics = trained["update step"][0](*trained["update step"][1])
    assert jax.numpy.isfinite(metrics["loss"])


# ------------------------------------------------------------------------------------------------ reward model
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_reward_model_plan_and_trainer_compile_the_same_programs(lora, tiny_root, tmp_path):
    """`rpo-plan` on a reward-model recipe plans `reward_steps` as `reward_model_task` runs them: the train step
    (donated state) and the eval step, with the same abstract `RewardModel` (score head, LoRA on the backbone)."""
    overrides = {"model.lora.rank": 4} if lora else {}
    c = load_recipe("reward_model_demo")
    c.model.path = str(tiny_root / "base")
    c.data.train, c.data.eval = str(tiny_root / "data" / "train.jsonl"), str(tiny_root / "data" / "test.jsonl")
    c.data.batch_size, c.data.eval_batch_size, c.data.max_length = 8, 8, 64
    c.metrics.tensorboard, c.train.progress_bar = False, False
    cfg = set_fields(c, overrides)
    run = reward_model.build_reward_run(cfg)
    plan = build_programs(cfg, jax.devices())
    assert plan.mode == "reward_model" and plan.layout.count == 0
    train_step, eval_step = reward_steps(run.config, run)
    rm = run.config.reward_model
    host = next(make_train_iterator(run.datasets["train"], local_batch_size(8, run.mesh), seed=0, shuffle=False))
    eval_host = next(make_eval_batches(run.datasets["eval"], local_batch_size(8, run.mesh)))
    trained = {
        "train step": (train_step, (run.state, to_global(pair_batch(host, rm.margin_scale), run.mesh))),
        "eval step": (eval_step, (run.state["params"], to_global(pair_batch(eval_host, rm.margin_scale), run.mesh))),
    }
    planned = {p.name: (p.jitted, p.args) for p in plan.programs}
    assert sorted(planned) == sorted(trained)
    full = run.datasets["train"].max_length == cfg.data.max_length
    for name in planned:
        assert_same_program(name, trained[name], planned[name], batch="full" if full else "layout")
    state, metrics = train_step(*trained["train step"][1])
    assert jax.numpy.isfinite(metrics["loss"])
