"""Command lines: `rpo-train` (train, or `--precompute` the reference cache) and `rpo-export WORKDIR OUT_DIR`.

    rpo-train                                        # the quickstart: bundled demo data, tiny Llama, CPU
    rpo-train --config configs/smollm2.py --workdir runs/smollm2 --config.loss.name=rpo_bwd_kl
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

import contextlib
import datetime
import importlib
import logging
import os
import pathlib
import sys
import traceback

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from rpo_jax.train.distributed import initialize_from_environment

_QUICKSTART = pathlib.Path(__file__).with_name("quickstart.py")


def unknown_field_error(error: Exception) -> ValueError:
    """ml_collections' KeyError / AttributeError for a `--config.X=V` override whose field the config lacks, as
    one clear line (the flag parser raises it while registering the overrides)."""
    name = str(error).strip("\"' ")
    return ValueError(f"a --config.* override names a field the config does not have: {name!r} (every field and "
                      "its default: rpo_jax/train/config.py)")


def _define_train_flags():
    try:
        config_flags.DEFINE_config_file("config", str(_QUICKSTART),
                                        "Recipe file (configs/NAME.py); default: quickstart.", lock_config=True)
    except (KeyError, AttributeError) as e:
        raise unknown_field_error(e) from e
    flags.DEFINE_string("workdir", "runs/quickstart", "Run directory: checkpoints, metrics, reference cache, export.")
    flags.DEFINE_bool("precompute", False,
                      "Preference training: only compute (or reuse) the reference log-prob cache, then exit.")
    flags.DEFINE_bool("verbose", False, "On an error, print the traceback too (always kept in WORKDIR/errors.log).")
    flags.DEFINE_string("from_trl", None, "A TRL 1.16 DPOConfig (.json/.yaml) mapped onto the --config recipe (the "
                        "mapping is printed); --config.* overrides apply on top (rpo_jax.train.from_trl).")


def _quiet_libraries() -> None:
    """Our progress at INFO; orbax/absl chatter only from WARNING up."""
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("rpo_jax").setLevel(logging.INFO)


@contextlib.contextmanager
def one_line_errors(program: str, workdir: str | None, verbose: bool):
    """Any exception in the block ends the program with `<program>: error: <message>` on stderr and exit status 1
    (130 for Ctrl-C); the traceback is appended to WORKDIR/errors.log when `workdir` exists, and printed with
    `verbose`."""
    try:
        yield
    except KeyboardInterrupt:
        print(f"{program}: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - the command line's last resort: report, keep the traceback
        trace = traceback.format_exc()
        where = None
        if workdir:
            from rpo_jax.train.workdir import add_to_error_log  # a local path or a URL
            where = add_to_error_log(
                workdir, f"--- {datetime.datetime.now().isoformat(timespec='seconds')} {program}\n{trace}\n")
        if verbose:
            print(trace, file=sys.stderr, end="")
        message = " ".join(str(e).split()) or type(e).__name__  # one line, whatever the library wrote
        if not isinstance(e, (ValueError, FileNotFoundError, RuntimeError)):
            message = f"{type(e).__name__}: {message}"
        hint = f" (traceback: {where})" if where and not verbose else ""
        print(f"{program}: error: {message}{hint}", file=sys.stderr, flush=True)
        if "jax" in sys.modules and sys.modules["jax"].distributed.is_initialized():
            # one of several processes: leave at once. A normal exit would wait in jax.distributed's shut-down
            # barrier for processes that wait in a collective for this one — every host would hang; this way
            # JAX's coordination service sees the process gone and stops the others with an error.
            sys.stdout.flush()
            os._exit(1)
        sys.exit(1)


def _train(argv):
    del argv
    _quiet_libraries()
    with one_line_errors("rpo-train", flags.FLAGS.workdir, flags.FLAGS.verbose):
        initialize_from_environment()
        cfg = flags.FLAGS.config
        if flags.FLAGS.from_trl:
            from rpo_jax.train.from_trl import apply_trl_config
            cfg, mapping = apply_trl_config(flags.FLAGS.from_trl, cfg,
                                            config_flags.get_override_values(flags.FLAGS["config"]))
            print(mapping, flush=True)
        if cfg.cpu_reuse_memory:
            from rpo_jax.train.host import reuse_cpu_step_memory
            reuse_cpu_step_memory()
        result = run_job(cfg, flags.FLAGS.workdir, precompute_only=flags.FLAGS.precompute)
        logging.info("done: %s", result)


#: config.mode → (module, function) of its job; imported only after jax.distributed.initialize.
JOBS = {"preference": ("rpo_jax.train.preference", "train"),
        "online": ("rpo_jax.train.online", "train_online"),
        "reward_model": ("rpo_jax.train.reward_model", "train_reward_model")}
MODES = tuple(JOBS)


def run_job(cfg, workdir: str, *, precompute_only: bool = False):
    """The job `config.mode` names: preference training, online RPO, or reward-model training
    (`--precompute` applies to preference training only)."""
    mode = cfg.get("mode", "preference")
    if mode not in JOBS:
        raise ValueError(f"config.mode={mode!r}: expected one of {MODES}")
    if precompute_only and mode != "preference":
        raise ValueError(f"--precompute computes the reference cache of preference training; config.mode={mode!r}")
    sync = cfg.get("reference_sync")
    if mode != "preference" and sync is not None and sync.get("every", 0):
        raise ValueError(f"config.reference_sync.every={sync.every}: reference sync (TR-DPO) is a setting of "
                         f"preference training; config.mode={mode!r} does not use it (set it to 0)")
    module, name = JOBS[mode]
    job = getattr(importlib.import_module(module), name)
    return job(cfg, workdir, precompute_only=True) if precompute_only else job(cfg, workdir)


def main(argv: list[str] | None = None) -> None:
    """`rpo-train` (`--from-trl` is also spelled `--from_trl`, absl's name for it)."""
    args = sys.argv[1:] if argv is None else argv
    with one_line_errors("rpo-train", None, "--verbose" in args):
        _define_train_flags()
    args = ["--from_trl" + a[len("--from-trl"):] if a.split("=")[0] == "--from-trl" else a for a in args]
    app.run(_train, argv=[sys.argv[0], *args])


def export_main(argv: list[str] | None = None) -> None:
    """`rpo-export WORKDIR OUT_DIR [--adapter]`: the latest checkpoint of a run as a Hugging Face directory (a
    LoRA run merged), or with --adapter a LoRA run's adapters as a PEFT adapter directory."""
    import argparse
    parser = argparse.ArgumentParser(prog="rpo-export", description=export_main.__doc__)
    parser.add_argument("workdir")
    parser.add_argument("out_dir", help="a new or empty directory, or an earlier export; not inside a run directory "
                                        "(other than WORKDIR/export)")
    parser.add_argument("--adapter", action="store_true",
                        help="a LoRA run: write its adapters as a PEFT directory (adapter_config.json + "
                             "adapter_model.safetensors, for peft.PeftModel.from_pretrained) instead of the merged "
                             "model")
    parser.add_argument("--verbose", action="store_true", help="on an error, print the traceback too")
    args = parser.parse_args(argv)
    _quiet_libraries()
    with one_line_errors("rpo-export", None, args.verbose):
        initialize_from_environment()
        from rpo_jax.train.export import export_workdir
        print(export_workdir(args.workdir, args.out_dir, adapter=args.adapter))


if __name__ == "__main__":
    main()
