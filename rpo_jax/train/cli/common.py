"""What every command line shares: one-line errors (the traceback to WORKDIR/errors.log), quiet
libraries, and the one-line message for a `--config.*` override naming no field.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
import traceback

from absl import logging as absl_logging


def unknown_field_error(error: Exception) -> ValueError:
    """ml_collections' KeyError / AttributeError for a `--config.X=V` override whose field the config lacks, as
    one clear line (the flag parser raises it while registering the overrides)."""
    name = str(error).strip("\"' ")
    return ValueError(f"a --config.* override names a field the config does not have: {name!r} (every field and "
                      "its default: rpo_jax/train/config/defaults.py)")


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
