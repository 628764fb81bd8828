"""The spellings of the config's enumerations and the parsers of its options that take more than one kind of
value (`rpo_jax.train.config.schema` uses them; so do the modules that read those options).

One spelling per option: `data.pairs` / `reward_model.pairs` are `rpo_jax.data.to_pairs`'s modes, with the
older spellings accepted as aliases and normalised; `data.packing` / `data.share_prompt` are True, False or
"auto" (command-line strings included); `model.score_window` is "auto", "off" or a number of positions.
"""

from __future__ import annotations

import re
from typing import Any, Literal

# `config.data.pairs` ("" keeps the K responses) and `config.reward_model.pairs` take `rpo_jax.data.to_pairs`'s
# modes, `PAIR_MODES`; their older spellings `PAIR_ALIASES` (recipes and `--from-trl` wrote them) are accepted
# and normalised (`rpo_jax.data.reward_pairs`, which pairs a reward model's records, spells them so too).
from rpo_jax.data.reward_pairs import PAIR_ALIASES, PAIR_MODES
from rpo_jax.models.hf_export import parse_size

#: `config.mode`: what trains (one job each in rpo_jax.train.jobs).
PREFERENCE, ONLINE, REWARD_MODEL = "preference", "online", "reward_model"
MODES = (PREFERENCE, ONLINE, REWARD_MODEL)
#: `config.data.packing` / `share_prompt` strings read as True / False.
TRUE_STRINGS = ("true", "1", "on", "yes")
FALSE_STRINGS = ("false", "0", "off", "no", "none", "")
#: `config.model.score_window` values meaning "every position".
SCORE_WINDOW_OFF = ("off", "", "0", "none")

Packing = bool | Literal["auto"]


class ConfigError(ValueError):
    """A config value refused, its message complete: one line naming the key path (`config.a.b=V: ...`)."""


def _choices(values) -> str:
    return ", ".join(repr(v) for v in values)


def parse_pairs(value: Any, *, allow_keep: bool = True) -> str:
    """A pair mode (`PAIR_MODES`, aliases normalised), or "" (keep the K responses) when `allow_keep`."""
    if isinstance(value, str):
        mode = PAIR_ALIASES.get(value, value)
        if mode in PAIR_MODES or (allow_keep and mode == ""):
            return mode
    allowed = (("",) if allow_keep else ()) + PAIR_MODES
    raise ValueError(f"expected one of {_choices(allowed)} (aliases {_choices(PAIR_ALIASES)})")


def parse_packing(value: Any) -> Packing:
    """A `data.packing` / `data.share_prompt` value → True, False or "auto" (the command line's strings too)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if value is None or isinstance(value, (str, int)) else None
    if text == "auto":
        return "auto"
    if text in TRUE_STRINGS:
        return True
    if text in FALSE_STRINGS:
        return False
    raise ValueError("expected True, False or 'auto'")


def parse_vocab_chunk(value: Any) -> str | int:
    """A `model.vocab_chunk_size` value → "auto" or a chunk of vocabulary rows ≥ 0 (0: off, one log-softmax)."""
    if isinstance(value, bool):
        raise ValueError("expected 'auto' or a number ≥ 0")
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    try:
        chunk = int(text)
    except ValueError:
        raise ValueError("expected 'auto' or a number ≥ 0") from None
    if chunk < 0:
        raise ValueError("expected 'auto' or a number ≥ 0 (0: off)")
    return chunk


def vocab_chunk_argument(setting: str | int) -> int | None:
    """The `vocab_chunk_size` argument of `rpo_jax.models.logprobs` for a `model.vocab_chunk_size` setting:
    None for "auto" (`auto_vocab_chunk` decides per head), else the number (0: one log-softmax over V)."""
    return None if setting == "auto" else int(setting)


def parse_score_window(value: Any) -> str | int:
    """A `model.score_window` value → "auto", "off" (also "", 0, "none", None) or a number of positions ≥ 1."""
    if isinstance(value, bool):
        raise ValueError("expected 'auto', 'off' or a number")
    text = str(value).strip().lower() if value is not None else "off"
    if text == "auto":
        return "auto"
    if text in SCORE_WINDOW_OFF:
        return "off"
    try:
        width = int(text)
    except ValueError:
        raise ValueError("expected 'auto', 'off' or a number") from None
    if width < 1:
        raise ValueError("expected 'auto', 'off' or a number ≥ 1")
    return width


#: `train.memory_budget="auto"`: this fraction of what the machine has.
AUTO_MEMORY_FRACTION = 0.9
_FRACTION = re.compile(r"\d+(?:\.\d*)?|\.\d+")


def parse_memory_budget(value: Any, field: str = "config.train.memory_budget") -> str:
    """A `train.memory_budget` value → its canonical text, or a ValueError naming `field`: `"auto"`
    (`AUTO_MEMORY_FRACTION` of what the machine has), `"0"` (no check), a fraction of what it has in (0, 1]
    (`"0.8"`), or a size (`rpo_jax.models.hf_export.parse_size`: "12GB", powers of 10 as transformers reads sizes;
    "1.5GiB", powers of 2)."""
    expected = "expected 'auto', 0 (no check), a fraction such as 0.8, or a size such as '12GB' or '12GiB'"
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{field}={value!r}: {expected}")
    text = str(value).strip()
    if text.lower() == "auto":
        return "auto"
    if _FRACTION.fullmatch(text):
        if float(text) > 1:
            raise ValueError(
                f"{field}={value!r}: a number without a unit is a fraction of the memory, in (0, 1]; write a size "
                "with its unit, e.g. '12GB'"
            )
        return "0" if float(text) == 0 else text
    try:
        parse_size(text, field)
    except ValueError:
        raise ValueError(f"{field}={value!r}: {expected}") from None
    return text


def memory_budget_bytes(setting: str, capacity: int) -> int | None:
    """Bytes a run may use under `setting` (`parse_memory_budget`'s text) on a machine with `capacity` bytes;
    None when the check is off (`"0"`)."""
    text = parse_memory_budget(setting)
    if text == "auto":
        return int(AUTO_MEMORY_FRACTION * capacity)
    if _FRACTION.fullmatch(text):
        return None if float(text) == 0 else int(float(text) * capacity)
    return parse_size(text)
