"""Chaos-tested resume: `kill -9` a training run at random moments, resume it every time, and compare the end
with an uninterrupted run of the same config.

    python benchmarks/chaos_resume.py                      # 300-step quickstart-sized run, 20 kills (~15 min here)
    python benchmarks/chaos_resume.py --kills 3 --config.train.steps=40  # shorter (the test suite runs one so)

Both runs are `rpo-train` subprocesses of one config written to OUT/config.py: the recipe `--config` (default the
quickstart: its model, data and loss) with 300 steps, a log record every 10, evaluation every 100 and a checkpoint
every 25 steps (`QUICKSTART_SIZED`), asynchronous checkpointing and the export at the end, as by default; any
`--config.KEY=VALUE` override (as rpo-train takes them, e.g. `--config.train.checkpoint_every=10`) on top. The
uninterrupted run gives the wall time T and the start-up time S (until its first metrics record). One attempt in
ten is killed during its start-up, after U(0, S) seconds; the others U(0, 2·r·(T − S)/n) seconds after their
first metrics record, where r is the fraction of the run left (from the newest checkpoint) and n the kills to go.
So the kills fall in start-up, steps, checkpoint writes, evaluations and the export alike while the run still
moves forward; after the last kill the run is resumed to its end.
What an attempt was doing when killed is read from what it left (its last console line, an orbax temporary
checkpoint directory, a partial export).

It checks, and prints as one JSON line: every parameter of the final checkpoint and of the export equal to the
uninterrupted run's (bit for bit), every logged value equal (timing fields aside), and metrics.jsonl holding
exactly one record per logged step, in order (no duplicate, no gap, replayed steps included). Exit status 0 only
when all hold.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import subprocess
import sys
import threading
import time

import numpy as np

QUICKSTART_SIZED = {"train.steps": 300, "train.log_every": 10, "train.eval_every": 100, "train.checkpoint_every": 25}


def write_config(out: pathlib.Path, overrides: dict, recipe: str | None = None) -> pathlib.Path:
    """OUT/config.py: the recipe (a configs/NAME.py path; default the quickstart) with `overrides` (dotted keys),
    no progress bar, a fixed MFU peak."""
    if recipe is None:
        head = ["from rpo_jax.train.config.quickstart import get_config as quickstart"]
    else:
        head = [
            "import importlib.util",
            "",
            f"_SPEC = importlib.util.spec_from_file_location('recipe', {str(pathlib.Path(recipe).resolve())!r})",
            "_RECIPE = importlib.util.module_from_spec(_SPEC)",
            "_SPEC.loader.exec_module(_RECIPE)",
            "quickstart = _RECIPE.get_config",
        ]
    lines = head + [
        "",
        "",
        "def get_config():",
        "    c = quickstart()",
        "    c.train.progress_bar = False",
        "    c.metrics.peak_flops = 1e11",
        "    c.metrics.tensorboard = False",
    ]
    lines += [f"    c.{key} = {value!r}" for key, value in overrides.items()]
    path = out / "config.py"
    path.write_text("\n".join(lines + ["    return c", ""]))
    return path


def train_command(config: pathlib.Path, workdir: pathlib.Path) -> list[str]:
    return [sys.executable, "-m", "rpo_jax.train.cli", f"--config={config}", f"--workdir={workdir}"]


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RPO_JAX_COORDINATOR")}
    env.update({"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
    return env


def checkpoint_steps(workdir: pathlib.Path) -> list[int]:
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def run_and_kill(command: list[str], env: dict, choose_delay, timeout: float) -> tuple[int, str]:
    """Start `command`; kill -9 it `choose_delay(started)` seconds after it starts (`started` False) or after its
    first metrics line on the console (`started` True), unless it ends first. Returns (exit status, console)."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines, first_record = [], threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("[step"):
                first_record.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    during_startup, delay = choose_delay()
    if not during_startup:
        first_record.wait(timeout)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.kill()
    proc.wait(timeout=timeout)
    reader.join(timeout)
    return proc.returncode, "".join(lines)


def phase_left_behind(workdir: pathlib.Path, console: str) -> str:
    """What a killed attempt was doing, read from what it left."""
    if any(p.name.startswith(".export.partial") for p in workdir.iterdir()):
        return "export"
    ckpts = workdir / "checkpoints"
    if ckpts.is_dir() and any("tmp" in p.name for p in ckpts.iterdir()):
        return "checkpoint write"
    last = [line for line in console.splitlines() if line.startswith("[step")]
    if not last:
        return "start-up"
    return "evaluation" if "eval/" in last[-1] else "steps"


def final_params(workdir: pathlib.Path) -> dict[str, np.ndarray]:
    """The parameters of the newest checkpoint, as flat numpy arrays."""
    import jax
    import orbax.checkpoint as ocp

    step = checkpoint_steps(workdir)[-1]
    path = workdir / "checkpoints" / str(step) / "params"
    checkpointer = ocp.StandardCheckpointer()
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), checkpointer.metadata(path).item_metadata.tree
    )
    tree = checkpointer.restore(path, target)
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def exported_tensors(workdir: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(workdir / "export" / "model.safetensors"))


def logged_values(workdir: pathlib.Path) -> list[dict]:
    """metrics.jsonl's records without the timing fields (perf/…, memory/…, and each record's time, elapsed_s)."""
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [
        {k: v for k, v in r.items() if "/perf/" not in k and "/memory/" not in k and k not in ("time", "elapsed_s")}
        for r in records
    ]


def chaos(
    out: pathlib.Path, *, kills: int, seed: int, overrides: dict, timeout: float = 1800, recipe: str | None = None
) -> dict:
    """Run the experiment in `out` (module docstring); returns the report."""
    out.mkdir(parents=True, exist_ok=True)
    config = write_config(out, overrides, recipe)
    env = environment()
    straight = out / "uninterrupted"
    console = open(out / "uninterrupted.log", "w", encoding="utf-8")
    start = time.perf_counter()
    proc = subprocess.Popen(train_command(config, straight), env=env, stdout=console, stderr=subprocess.STDOUT)
    startup = None
    metrics = straight / "metrics.jsonl"
    while proc.poll() is None:
        if startup is None and metrics.exists() and metrics.stat().st_size:
            startup = time.perf_counter() - start
        time.sleep(0.05)
    total = time.perf_counter() - start
    console.close()
    if proc.returncode != 0:
        raise RuntimeError(f"the uninterrupted run failed:\n{(out / 'uninterrupted.log').read_text()[-3000:]}")
    startup = min(startup or total / 4, total)

    rng = random.Random(seed)
    chaotic = out / "interrupted"
    phases, attempts = [], 0
    steps = int(overrides["train.steps"])
    for i in range(kills):
        left = 1 - max(checkpoint_steps(chaotic), default=0) / steps

        def choose_delay():
            if rng.random() < 0.1:
                return True, rng.uniform(0, startup)
            return False, rng.uniform(0, 2 * left * (total - startup) / (kills - i))

        attempts += 1
        code, console = run_and_kill(train_command(config, chaotic), env, choose_delay, timeout)
        if code == 0:
            phases.append("finished before the kill")
            continue
        if code != -9:
            raise RuntimeError(f"attempt {attempts} failed (exit {code}):\n{console[-3000:]}")
        phases.append(phase_left_behind(chaotic, console))
    final = subprocess.run(train_command(config, chaotic), env=env, capture_output=True, text=True, timeout=timeout)
    if final.returncode != 0:
        raise RuntimeError(f"the final resume failed:\n{final.stdout[-2000:]}{final.stderr[-2000:]}")

    expected, got = final_params(straight), final_params(chaotic)
    params_equal = expected.keys() == got.keys() and all(np.array_equal(expected[k], got[k]) for k in expected)
    export_a, export_b = exported_tensors(straight), exported_tensors(chaotic)
    export_equal = export_a.keys() == export_b.keys() and all(
        np.array_equal(export_a[k], export_b[k]) for k in export_a
    )
    logged_a, logged_b = logged_values(straight), logged_values(chaotic)
    steps_b = [(r["step"], sorted(r)) for r in logged_b]
    report = {
        "kills": kills,
        "seed": seed,
        "uninterrupted_s": round(total, 1),
        "startup_s": round(startup, 1),
        "phases": {p: phases.count(p) for p in sorted(set(phases))},
        "params_equal": params_equal,
        "export_equal": export_equal,
        "metrics_equal": logged_a == logged_b,
        "one_record_per_logged_step": steps_b == [(r["step"], sorted(r)) for r in logged_a]
        and len(set(map(str, steps_b))) == len(steps_b),
        "records": len(logged_b),
    }
    report["ok"] = all(
        report[k] for k in ("params_equal", "export_equal", "metrics_equal", "one_record_per_logged_step")
    )
    return report


def main(argv=None) -> None:
    benchmarks = str(pathlib.Path(__file__).resolve().parent)
    if benchmarks not in sys.path:  # imported by path (tests), not run as a script
        sys.path.insert(0, benchmarks)
    import common

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/chaos_resume", help="work directories and the config go here")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args, _, given = common.parse_args(parser, argv, common.QUICKSTART)
    out = pathlib.Path(args.out)
    if out.exists() and any(out.iterdir()):
        parser.error(f"{out} is not empty: pass a new --out")
    overrides = {**QUICKSTART_SIZED, **given}
    recipe = None if pathlib.Path(args.config).resolve() == common.QUICKSTART.resolve() else args.config
    report = chaos(out, kills=args.kills, seed=args.seed, overrides=overrides, recipe=recipe)
    print(json.dumps(report))
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
