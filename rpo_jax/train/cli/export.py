"""`rpo-export WORKDIR OUT_DIR [--adapter]`: a run's latest checkpoint as a Hugging Face directory (or a
LoRA run's adapters as a PEFT directory). It ends with one line: `rpo-export: wrote <kind> to <dir>` (kind: "Hugging
Face model", "reward model" or "PEFT adapter").
"""

from __future__ import annotations

from rpo_jax.train.cli.common import one_line_errors, quiet_libraries
from rpo_jax.train.runtime.processes import initialize_from_environment


def export_main(argv: list[str] | None = None) -> None:
    """`rpo-export WORKDIR OUT_DIR [--adapter]`: the latest checkpoint of a run as a Hugging Face directory (a
    LoRA run merged), or with --adapter a LoRA run's adapters as a PEFT adapter directory."""
    import argparse

    parser = argparse.ArgumentParser(prog="rpo-export", description=export_main.__doc__)
    parser.add_argument("workdir")
    parser.add_argument(
        "out_dir",
        help="a new or empty directory, or an earlier export; not inside a run directory (other than WORKDIR/export)",
    )
    parser.add_argument(
        "--adapter",
        action="store_true",
        help="a LoRA run: write its adapters as a PEFT directory (adapter_config.json + "
        "adapter_model.safetensors, for peft.PeftModel.from_pretrained) instead of the merged "
        "model",
    )
    parser.add_argument("--verbose", action="store_true", help="on an error, print the traceback too")
    args = parser.parse_args(argv)
    quiet_libraries()
    with one_line_errors("rpo-export", None, args.verbose):
        initialize_from_environment()
        import jax

        from rpo_jax.train.core.export import export_kind, export_workdir
        from rpo_jax.train.core.workdir import read_run_config

        out = export_workdir(args.workdir, args.out_dir, adapter=args.adapter)
        if jax.process_index() == 0:
            kind = export_kind(read_run_config(args.workdir).get("mode", "preference"), args.adapter)
            print(f"rpo-export: wrote {kind} to {out}", flush=True)
