"""`rpo-train`: train (or `--precompute` the reference cache) with a recipe, `--config.*` overrides or `--from-trl`.

    rpo-train                                        # the quickstart: bundled demo data, tiny Llama, CPU
    rpo-train --config configs/smollm2.py --config.data.train=prefs.jsonl --workdir runs/smollm2
    rpo-train --config configs/mrpo.py --precompute  # reference log-probs only
    rpo-export runs/smollm2 exported/                # Hugging Face directory with the tokenizer (LoRA: merged)
    rpo-export runs/lora adapter/ --adapter          # a LoRA run's adapters as a PEFT directory
    rpo-train --config configs/online_demo.py        # online RPO (config.mode="online")
    rpo-train --config configs/reward_model_demo.py  # Bradley–Terry reward model (config.mode="reward_model")
    rpo-train --from-trl dpo.yaml --config.model.path=DIR --config.data.train=prefs.jsonl  # a TRL DPOConfig

An error ends either command with one line on stderr (`rpo-train: error: …`) and exit status 1; the traceback
goes to WORKDIR/errors.log when the work directory exists, and to stderr with `--verbose`.
"""

from __future__ import annotations

import importlib
import logging
import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

from rpo_jax.train.cli.common import dashed_flags, help_text, one_line_errors, quiet_libraries, unknown_field_error
from rpo_jax.train.config.validation import validate
from rpo_jax.train.config.values import ONLINE, PREFERENCE, REWARD_MODEL
from rpo_jax.train.runtime.processes import initialize_from_environment

_QUICKSTART = pathlib.Path(__file__).parent.parent / "config" / "quickstart.py"


def _define_train_flags(argv: list[str]):
    try:  # sys_argv: the overrides to register (else read from sys.argv, which is not `argv` in-process)
        config_flags.DEFINE_config_file(
            "config",
            str(_QUICKSTART),
            "Recipe file (configs/NAME.py); default: quickstart.",
            lock_config=True,
            sys_argv=argv,
        )
    except (KeyError, AttributeError) as e:
        raise unknown_field_error(e) from e
    flags.DEFINE_string("workdir", "runs/quickstart", "Run directory: checkpoints, metrics, reference cache, export.")
    flags.DEFINE_bool(
        "precompute", False, "Preference training: only compute (or reuse) the reference log-prob cache, then exit."
    )
    flags.DEFINE_bool("verbose", False, "On an error, print the traceback too (always kept in WORKDIR/errors.log).")
    flags.DEFINE_string(
        "from_trl",
        None,
        "A TRL 1.16 DPOConfig (.json/.yaml) mapped onto the --config recipe (the "
        "mapping is printed); --config.* overrides apply on top (rpo_jax.train.config.from_trl).",
    )


def _train(argv):
    del argv
    quiet_libraries()
    with one_line_errors("rpo-train", flags.FLAGS.workdir, flags.FLAGS.verbose):
        initialize_from_environment()
        cfg = flags.FLAGS.config
        if flags.FLAGS.from_trl:
            from rpo_jax.train.config.from_trl import apply_trl_config

            cfg, mapping = apply_trl_config(
                flags.FLAGS.from_trl, cfg, config_flags.get_override_values(flags.FLAGS["config"])
            )
            print(mapping, flush=True)
        cfg = validate(cfg)  # once, at the boundary: one line naming the key for a bad value
        if cfg.cpu_reuse_memory:
            from rpo_jax.train.runtime.cpu_memory import reuse_cpu_step_memory

            reuse_cpu_step_memory()
        result = run_job(cfg, flags.FLAGS.workdir, precompute_only=flags.FLAGS.precompute)
        logging.info("done: %s", result)


#: config.mode → (module, function) of its job; imported only after jax.distributed.initialize.
JOBS = {
    PREFERENCE: ("rpo_jax.train.jobs.preference", "train"),
    ONLINE: ("rpo_jax.train.jobs.online", "train_online"),
    REWARD_MODEL: ("rpo_jax.train.jobs.reward_model", "train_reward_model"),
}


def run_job(cfg, workdir: str, *, precompute_only: bool = False):
    """The job `config.mode` names: preference training, online RPO, or reward-model training
    (`--precompute` applies to preference training only). The config (a ConfigDict or a `RunConfig`) is
    validated first (`rpo_jax.train.config.validation.validate`: the schema's rules, one line per refusal)."""
    cfg = validate(cfg)
    if precompute_only and cfg.mode != "preference":
        raise ValueError(f"--precompute computes the reference cache of preference training; config.mode={cfg.mode!r}")
    module, name = JOBS[cfg.mode]
    job = getattr(importlib.import_module(module), name)
    return job(cfg, workdir, precompute_only=True) if precompute_only else job(cfg, workdir)


def main(argv: list[str] | None = None) -> None:
    """`rpo-train` (multi-word flags are spelled with dashes, `--from-trl`; absl's `--from_trl` also works)."""
    args = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(args):
        if "workdir" not in flags.FLAGS:  # (defined already when called in-process before)
            _define_train_flags([sys.argv[0]])
        print(help_text("rpo-train", __doc__, flags.FLAGS, __name__), end="")
        sys.exit(0)
    with one_line_errors("rpo-train", None, "--verbose" in args):
        _define_train_flags([sys.argv[0], *args])
    app.run(_train, argv=[sys.argv[0], *dashed_flags(args, {"from_trl"})])


if __name__ == "__main__":
    main()
