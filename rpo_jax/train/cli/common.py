"""What every command line shares: one-line errors (the traceback to WORKDIR/errors.log), quiet
libraries, and the one-line message for a `--config.*` override naming no key (the schema's,
`rpo_jax.train.config.validation.unknown_key_message`).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import sys
import traceback

from absl import logging as absl_logging

from rpo_jax.train.config.validation import unknown_key_message


def _override_path(error: Exception) -> str | None:
    """The dotted key path (without "config.") of the `--config.*` override `error` was raised for: ml_collections'
    override parser names it `field_path` (read from the traceback), else the one override on the command line
    whose last key the error names."""
    tb = error.__traceback__
    while tb is not None:
        path = tb.tb_frame.f_locals.get("field_path")
        if isinstance(path, str) and path:
            return path
        tb = tb.tb_next
    name = re.search(r"[A-Za-z_]\w*", str(error))
    for arg in sys.argv[1:]:
        key = arg.split("=", 1)[0]
        if key.startswith("--config.") and name and key.rsplit(".", 1)[-1] == name.group(0):
            return key[len("--config.") :]
    return None


def unknown_field_error(error: Exception) -> ValueError:
    """ml_collections' KeyError / AttributeError for a `--config.X=V` override whose key the config lacks, as the
    schema's one line (`config.train.stepz: no such key; did you mean 'steps'? (keys of config.train: ...)`; the
    flag parser raises it while registering the overrides)."""
    path = _override_path(error)
    if path is not None:
        suggested = re.search(r'Did you mean "([^"]+)"', str(error))
        return ValueError(unknown_key_message(path, suggested.group(1) if suggested else None))
    name = " ".join(str(error).split()).strip("\"' ")
    return ValueError(
        f"a --config.* override names a key the config does not have: {name!r} (every key, its "
        "default and meaning: rpo_jax/train/config/schema.py)"
    )


def quiet_libraries() -> None:
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
            from rpo_jax.train.core.workdir import add_to_error_log  # a local path or a URL

            where = add_to_error_log(
                workdir, f"--- {datetime.datetime.now().isoformat(timespec='seconds')} {program}\n{trace}\n"
            )
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


def dashed_flags(args: list[str], names) -> list[str]:
    """`--some-flag[=V]` → `--some_flag[=V]` for each of `names` (absl's spelling of multi-word flags). Every
    command line is spelled with dashes (`--from-trl`, `--dump-hlo`, as `rpo-export` / `rpo-data`'s argparse
    flags are); the underscore form stays accepted."""
    out = []
    for a in args:
        flag, eq, value = a.partition("=")
        if flag.startswith("--") and flag[2:].replace("-", "_") in names:
            a = "--" + flag[2:].replace("-", "_") + eq + value
        out.append(a)
    return out


def help_text(program: str, doc: str, flag_values, module: str) -> str:
    """`--help` of an absl command: what it does (its module docstring), then its own flags (spelled with dashes)
    and the `--config.*` overrides."""
    listing = flag_values.module_help(module).replace(f"{module}:\n", "")
    lines = [
        re.sub(r"^(\s*--(?:\[no\])?)(\w+):", lambda m: m.group(1) + m.group(2).replace("_", "-") + ":", line)
        for line in listing.splitlines()
    ]
    return (
        f"usage: {program} [flags] [--config.KEY=VALUE ...]\n\n{doc.strip()}\n\nflags:\n"
        + "\n".join(lines)
        + "\n  --config.KEY=VALUE: override any field of the recipe (e.g. --config.train.steps=100)\n"
    )
