"""`config.loss` against the rest of the config for the losses of TRL's other trainers (issue 29): what the unpaired
KTO / APO-zero / BCO and ORPO's NLL over prompt + response tokens need is checked before any model loads, each
refusal one line naming the key; the settings they train with validate."""

from __future__ import annotations

import pytest

from rpo_jax.train.config.defaults import base_config
from rpo_jax.train.config.validation import validate


def _config(name: str, hparams: dict | None = None, **fields) -> dict:
    c = base_config().to_dict()
    c["loss"]["name"], c["loss"]["hparams"] = name, dict(hparams or {"beta": 0.1})
    for dotted, value in fields.items():
        node = c
        *path, last = dotted.split("__")
        for key in path:
            node = node[key]
        node[last] = value
    return c


def _refused(config: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        validate(config)
    text = str(info.value)
    assert text.startswith(message) and "\n" not in text, text


@pytest.mark.parametrize("name", ["kto", "apo_zero_unpaired", "bco"])
def test_unpaired_losses_validate_with_the_settings_they_train_with(name):
    cfg = validate(_config(name, data__shuffle=False, data__unpair=True, data__pairs="best_vs_worst"))
    assert cfg.loss.name == name and cfg.data.unpair


def test_kto_needs_file_order_and_two_rows_per_micro_batch():
    _refused(_config("kto"), "config.data.shuffle=True: loss 'kto' pairs each record with the completion")
    assert validate(_config("apo_zero_unpaired")).data.shuffle  # no mismatched completions: shuffling is fine
    _refused(
        _config("kto", data__shuffle=False, data__batch_size=4, data__micro_batches=4),
        "config.data.batch_size=4: loss 'kto' pairs each record with another record's completion",
    )


def test_unpaired_losses_refuse_what_they_cannot_train_with():
    _refused(_config("bco", mode="online"), "config.mode='online': loss 'bco' trains on unpaired records")
    _refused(_config("bco", data__pairs="best_vs_worst"), "config.data.pairs='best_vs_worst': loss 'bco' trains on")
    _refused(
        _config("bco", references=[{"path": "other/model"}]),
        "config.references[0].tokenizer='other/model': loss 'bco' scores its reference on the policy's tokens",
    )
    _refused(_config("dpo", data__unpair=True), "config.data.unpair=True reads labelled pairs as unpaired records")
    _refused(_config("bco", data__format="trl_standard"), "config.data.format='trl_standard': loss 'bco' reads")
    _refused(_config("bco", data__unpair_block=8), "config.data.unpair_block=8: the blocks of data.unpair=True's")
    assert validate(
        _config("bco", data__format="k_responses", data__pairs="best_vs_worst", data__unpair=True)
    ).data.unpair


def test_orpo_sequence_nll_scores_every_position_of_padded_batches():
    assert validate(_config("orpo")).loss.name == "orpo"
    _refused(_config("orpo", data__packing=True), "config.data.packing=True: loss 'orpo' with nll_tokens='sequence'")
    _refused(_config("orpo", model__score_window=64), "config.model.score_window=64: loss 'orpo' with nll_tokens=")
    _refused(_config("orpo", mode="online"), "config.mode='online': loss 'orpo' with nll_tokens='sequence'")
    assert validate(_config("orpo", {"beta": 0.1, "nll_tokens": "response"}, data__packing=True)).data.packing
    assert validate(_config("cpo", {"beta": 0.1, "loss_type": "simpo", "cpo_alpha": 0.0, "alpha": 0.2})).loss.name
