"""`config.loss` refuses, before any model loads and in one line, the losses whose inputs rpo-train does not compute
yet (issue 29): the unpaired KTO / APO-zero / BCO and ORPO's NLL over prompt + response tokens; CPO and ORPO with
the response-token NLL validate (the trainer's `PreferenceLogps` carries what they read)."""

from __future__ import annotations

import pytest

from rpo_jax.train.config.defaults import base_config
from rpo_jax.train.config.validation import validate


def _config(name: str, **hparams) -> dict:
    c = base_config().to_dict()
    c["loss"]["name"], c["loss"]["hparams"] = name, hparams
    return c


@pytest.mark.parametrize("name", ["kto", "apo_zero_unpaired", "bco"])
def test_unpaired_losses_are_refused_naming_the_key(name):
    with pytest.raises(ValueError) as info:
        validate(_config(name, beta=0.1))
    message = str(info.value)
    assert message.startswith(f"config.loss.name={name!r}: an unpaired loss") and "\n" not in message


def test_orpo_with_the_sequence_nll_is_refused_and_with_the_response_nll_validates():
    with pytest.raises(ValueError, match=r"config.loss: loss 'orpo' with nll_tokens='sequence'.*nll_tokens='response'"):
        validate(_config("orpo", beta=0.1))
    assert validate(_config("orpo", beta=0.1, nll_tokens="response")).loss.name == "orpo"
    assert validate(_config("cpo", beta=0.1, loss_type="simpo", cpo_alpha=0.0, alpha=0.2)).loss.name == "cpo"
