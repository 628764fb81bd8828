"""Helpers shared by the rpo_jax.data tests."""

from __future__ import annotations

import json
import pathlib


def write_lines(path: pathlib.Path, lines: list) -> pathlib.Path:
    """Write JSON objects (dicts), raw strings or raw bytes one per line."""
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, bytes):
                f.write(line + b"\n")
            elif isinstance(line, str):
                f.write(line.encode("utf-8") + b"\n")
            else:
                f.write(json.dumps(line).encode("utf-8") + b"\n")
    return path
