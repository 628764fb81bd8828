"""Run a command and watch its resident memory: the peak RSS of its whole process tree (sampled every 0.2 s), a
timeline, and a kill when it passes a limit — so an experiment on a shared machine cannot take the others down.

    python benchmarks/rss_watch.py --limit-gib 11 --timeline rss.tsv -- rpo-train --config configs/smollm2.py ...

Prints one last line `rss_watch: peak X.XX GiB (...), exit N, S s` (or `rss_watch: exceeded L GiB at X.XX GiB,
killed`, exit 137). The timeline file has one line per sample: seconds since start, RSS GiB of the tree.
`watch(...)` does the same from Python (`benchmarks/memory.py` runs each mode in a watched child process).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import subprocess
import sys
import time

import psutil

GIB = 2**30


def tree_rss(proc: psutil.Process) -> int:
    """Bytes resident in `proc` and all its descendants (0 for a process that has gone)."""
    total = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


@dataclasses.dataclass
class Watched:
    """What `watch` saw: the exit code (negative: killed by that signal), the peak RSS of the process tree sampled
    every interval (GiB), the child's own peak RSS as the kernel counted it (`ru_maxrss`, GiB: no sample misses
    it), whether the limit was passed (the tree was killed), and the wall time in seconds."""

    code: int
    sampled_gib: float
    maxrss_gib: float
    exceeded: bool
    seconds: float

    @property
    def peak_gib(self) -> float:
        return max(self.sampled_gib, self.maxrss_gib)


def watch(
    command: list[str],
    *,
    limit_gib: float,
    interval: float = 0.2,
    timeline: str | None = None,
    env: dict | None = None,
    stdout=None,
    stderr=None,
) -> Watched:
    """Run `command` in a new session, sampling its tree's RSS every `interval` s; kill the session when it
    exceeds `limit_gib` (`Watched.exceeded`)."""
    start = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=stdout, stderr=stderr, start_new_session=True)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # a SIGTERM to the watcher ends the child too
    proc = psutil.Process(child.pid)
    peak, exceeded, status, usage = 0, False, None, None
    out = open(timeline, "w") if timeline else None
    try:
        while status is None:
            pid, code, rusage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                status, usage = code, rusage
                break
            rss = tree_rss(proc)
            peak = max(peak, rss)
            if out:
                out.write(f"{time.perf_counter() - start:.1f}\t{rss / GIB:.3f}\n")
            if rss > limit_gib * GIB:
                exceeded = True
                os.killpg(child.pid, signal.SIGKILL)
                _, status, usage = os.wait4(child.pid, 0)
                break
            time.sleep(interval)
    finally:
        if status is None:  # interrupted: leave nothing behind
            os.killpg(child.pid, signal.SIGKILL)
            os.wait4(child.pid, 0)
        if out:
            out.close()
        signal.signal(signal.SIGTERM, previous)
    child.returncode = os.waitstatus_to_exitcode(status)
    return Watched(child.returncode, peak / GIB, usage.ru_maxrss / 2**20, exceeded, time.perf_counter() - start)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit-gib", type=float, default=11.0, help="kill the command's process tree above this RSS")
    p.add_argument("--interval", type=float, default=0.2, help="seconds between samples")
    p.add_argument("--timeline", default=None, help="write 'seconds<TAB>GiB' per sample to this file")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- the command to run")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("no command given (after --)")
    seen = watch(command, limit_gib=args.limit_gib, interval=args.interval, timeline=args.timeline)
    if seen.exceeded:
        print(f"rss_watch: exceeded {args.limit_gib:g} GiB at {seen.sampled_gib:.2f} GiB, killed", file=sys.stderr)
        return 137
    print(
        f"rss_watch: peak {seen.peak_gib:.2f} GiB (sampled {seen.sampled_gib:.2f}, maxrss {seen.maxrss_gib:.2f}), "
        f"exit {seen.code}, {seen.seconds:.0f} s",
        file=sys.stderr,
    )
    return seen.code


if __name__ == "__main__":
    sys.exit(main())
