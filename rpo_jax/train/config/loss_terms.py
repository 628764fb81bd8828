"""`config.loss` checked against the loss registry (`rpo_jax.losses.registry.LOSSES`): the loss names, each term's
hyperparameters by the registry's own validators (so `config.loss.hparams.beta=-1` is refused naming that key),
and the weighted combination as `make_loss` builds it. Nothing here reads a file or builds a model.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from typing import Any

from rpo_jax.losses import available_losses, make_loss
from rpo_jax.losses.registry import LOSSES
from rpo_jax.train.config.values import ConfigError


def did_you_mean(name: Any, choices: Sequence[str]) -> str:
    """ "; did you mean 'x'?" for the closest of `choices` to `name`, or "" when none is close."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _expected(error: Exception) -> str:
    """The registry's "hyperparameter 'beta' must be > 0, got -1" as "expected > 0"."""
    text = " ".join(str(error).split())
    found = re.match(r"hyperparameter '[^']*' must be (.*?), got .*$", text)
    if found:
        return f"expected {found.group(1)}"
    return re.sub(r"^hyperparameter '[^']*' ", "", text)


def check_term(where: str, name: Any, hparams: Mapping[str, Any], name_key: str) -> None:
    """A ConfigError naming the key for a loss `name` the registry does not have (`name_key`: its key path) or a
    hyperparameter of `hparams` it refuses (`where.hparams.KEY=V: ...`)."""
    if not isinstance(name, str) or name not in LOSSES:
        names = available_losses()
        raise ConfigError(
            f"{name_key}={_show(name)}: expected a loss of rpo_jax.losses.available_losses()"
            f"{did_you_mean(name, names)} ({', '.join(names)})"
        )
    definition = LOSSES[name]
    for key, value in hparams.items():
        if key not in definition.hparams:
            known = sorted(definition.hparams)
            raise ConfigError(
                f"{where}.hparams.{key}: no such hyperparameter of loss {name!r}"
                f"{did_you_mean(key, known)} (hyperparameters of {name!r}: "
                f"{', '.join(known) or 'none'})"
            )
        try:
            definition.hparams[key][1](key, value)
        except ValueError as e:
            raise ConfigError(f"{where}.hparams.{key}={_show(value)}: {_expected(e)}") from None
    try:
        definition.resolve(dict(hparams))  # the loss's checks across its hyperparameters
    except ValueError as e:
        raise ConfigError(f"{where}.hparams={_show(dict(hparams))}: {' '.join(str(e).split())}") from None


def extra_term(index: int, entry: Any) -> tuple[str, float, dict]:
    """`config.loss.extra[index]` (`[name, weight]` or `[name, weight, {hparams}]`) as (name, weight, hparams);
    a ConfigError naming it when it is not one."""
    where = f"config.loss.extra[{index}]"
    ok = (
        isinstance(entry, (list, tuple))
        and len(entry) in (2, 3)
        and isinstance(entry[0], str)
        and isinstance(entry[1], (int, float))
        and not isinstance(entry[1], bool)
        and (len(entry) == 2 or isinstance(entry[2], Mapping))
    )
    if not ok:
        raise ConfigError(
            f"{where}={_show(entry)}: expected [name, weight] or [name, weight, {{hparams}}] (e.g. ['sft', 0.05, {{}}])"
        )
    hparams = dict(entry[2]) if len(entry) == 3 else {}
    check_term(where, entry[0], hparams, f"{where}[0]")
    return entry[0], float(entry[1]), hparams


def loss_terms(
    name: str, weight: float, hparams: Mapping[str, Any], extra: Sequence[Any]
) -> list[tuple[str, float, dict]]:
    """`config.loss` as the weighted terms `make_loss` takes: the main term first (each term checked)."""
    check_term("config.loss", name, hparams, "config.loss.name")
    return [(name, float(weight), dict(hparams)), *(extra_term(i, e) for i, e in enumerate(extra))]


def build_terms(terms: list[tuple[str, float, dict]]):
    """`make_loss` of the terms as the trainer builds it (`rpo_jax.train.build.state.build_loss`): one loss by name
    when there is a single term of weight 1, else the weighted combination."""
    (name, weight, hparams), extra = terms[0], terms[1:]
    if not extra and weight == 1.0:
        return make_loss(name, **hparams)
    return make_loss(terms)


def loss_spec(terms: list[tuple[str, float, dict]]):
    """The `LossSpec` of the terms (what the loss needs: references, rewards), or a ConfigError for a combination
    `make_loss` refuses."""
    try:
        spec = build_terms(terms).spec
    except ValueError as e:
        raise ConfigError(f"config.loss: {' '.join(str(e).split())}") from None
    return spec


def check_loss_inputs(cfg) -> None:
    """The rules between `config.loss` and the rest of a `RunConfig` for the losses whose inputs are not the
    responses' log-probs alone (a ConfigError naming the key, before any model loads):

    * unpaired losses (`kto`, `apo_zero_unpaired`, `bco`: single completions labelled desirable or undesirable,
      `rpo_jax.losses.UnpairedLogps`) train in `mode="preference"` on unpaired records (`data.unpair=True` reads
      labelled pairs, or the pairs `data.pairs` derives from rewards, as two of them) with the policy's
      tokenizer; `kto`'s mismatched completions come from the record before in file order within each micro-batch
      of `data.batch_size / data.micro_batches` ≥ 2 records (TRL's `KTOTrainer`: sequential sampling, a
      per-device batch > 1);
    * `orpo` with `nll_tokens="sequence"` (TRL's NLL over prompt + response tokens) scores every position of
      padded batches in `mode="preference"`: no numeric `model.score_window`, no `data.packing=True`.
    """
    spec = loss_spec(cfg.loss.terms())
    data, name = cfg.data, f"loss {cfg.loss.name!r}"
    if data.unpair and not spec.unpaired:
        raise ConfigError(
            f"config.data.unpair=True reads labelled pairs as unpaired records, which only the unpaired losses "
            f"(kto, apo_zero_unpaired, bco) train on; {name} takes the pairs themselves (set data.unpair=False)"
        )
    if data.unpair_block != 1000 and not data.unpair:
        raise ConfigError(
            f"config.data.unpair_block={data.unpair_block}: the blocks of data.unpair=True's order; set "
            "data.unpair=True or leave it at 1000"
        )
    if spec.unpaired:
        if cfg.mode != "preference":
            raise ConfigError(f"config.mode={cfg.mode!r}: {name} trains on unpaired records in mode='preference' only")
        if data.pairs and not data.unpair:
            raise ConfigError(
                f"config.data.pairs={data.pairs!r}: {name} trains on unpaired records; pairs derived from rewards "
                "become unpaired records with data.unpair=True (best desirable, worst undesirable)"
            )
        if data.format and not data.pairs:
            raise ConfigError(
                f"config.data.format={data.format!r}: {name} reads unpaired records, whose files are recognised as "
                "such (and labelled pairs with data.unpair=True); leave data.format empty"
            )
        policy = cfg.model.tokenizer or cfg.model.path
        for i, ref in enumerate(cfg.references):
            if ref.path and (ref.tokenizer or ref.path) != policy:
                own = policy or "the demo tokenizer"
                raise ConfigError(
                    f"config.references[{i}].tokenizer={ref.tokenizer or ref.path!r}: {name} scores its reference "
                    f"on the policy's tokens; give the reference the policy's tokenizer ({own})"
                )
    if spec.requires_kl_logps:
        block = data.batch_size // data.micro_batches
        if block < 2:
            raise ConfigError(
                f"config.data.batch_size={data.batch_size}: {name} pairs each record with another record's "
                f"completion of its micro-batch, which needs data.batch_size / data.micro_batches ≥ 2 (got {block}; "
                "TRL's KTOTrainer refuses per_device_train_batch_size ≤ 1)"
            )
        if data.shuffle:
            raise ConfigError(
                f"config.data.shuffle=True: {name} pairs each record with the completion of the record before it "
                "in file order, within each micro-batch (TRL's KTOTrainer requires "
                "train_sampling_strategy='sequential'); set data.shuffle=False (shuffle the file beforehand), or use "
                "'apo_zero_unpaired' (KTO without the KL term)"
            )
    if spec.requires_sequence_logps:
        where = "loss 'orpo' with nll_tokens='sequence' (TRL's NLL over prompt + response tokens)"
        if cfg.mode != "preference":
            raise ConfigError(f"config.mode={cfg.mode!r}: {where} trains in mode='preference' only")
        if isinstance(cfg.model.score_window, int):
            raise ConfigError(
                f"config.model.score_window={cfg.model.score_window}: {where} scores every position; use 'auto' "
                "or 'off'"
            )
        if data.packing is True:
            raise ConfigError(
                f"config.data.packing=True: {where} needs each sequence's prompt tokens, which packed rows do not "
                "mark; use packing='auto' or False (padded batches), or nll_tokens='response'"
            )
