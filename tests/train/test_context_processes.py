"""`rpo-train` with the mesh's context axis spanning processes (`config.mesh.processes`): which rows each process
feeds (`process_rows`: processes whose devices hold the same batch shards feed the same rows), the setting's
one-line errors, and a 2-process × 4-device run (context 2 across the processes) equal to 1 process × 8 devices
without a context axis: losses and eval losses of padded and packed (shared-prompt) batches, references cached.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from rpo_jax.train.config.validation import validate
from rpo_jax.train.jobs import preference
from rpo_jax.train.runtime.global_batches import RowGroup, config_mesh, process_rows, row_groups
from tests.train.test_multihost import finish, start_processes
from tests.train.trainer_testlib import read_metrics, tiny_config, write_config

ACROSS = {"data": 1, "fsdp": 2, "tensor": 2, "context": 2, "processes": {"context": 2}}
WHOLE = {"data": 1, "fsdp": 4, "tensor": 2}


def test_processes_holding_the_same_shards_feed_the_same_rows():
    """4 batch shards: 4 processes with one each are groups 0..3 (process p: block p); 2 processes holding all
    4 (context across them) are one group; 4 processes in pairs are 2 groups numbered by their first shard."""
    assert row_groups([{0}, {1}, {2}, {3}], 4) == [RowGroup(i, 4) for i in range(4)]
    assert row_groups([{0, 1, 2, 3}, {0, 1, 2, 3}], 4) == [RowGroup(0, 1)] * 2
    assert row_groups([{2, 3}, {0, 1}, {2, 3}, {0, 1}], 4) == [RowGroup(1, 2), RowGroup(0, 2)] * 2
    assert row_groups([{0}], 1) == [RowGroup(0, 1)]


@pytest.mark.parametrize(
    "held",
    [[{0, 2}, {1, 3}], [{0, 1}, {1, 2}], [{0}, {1, 2, 3}], [{0, 1}, {0, 1}]],
    ids=["interleaved", "overlapping", "unequal", "missing"],
)
def test_shards_that_are_not_blocks_are_one_line(held):
    with pytest.raises(
        ValueError, match=r"^config\.mesh: the processes' devices hold batch shards .* with config\.mesh\.processes$"
    ):
        row_groups(held, 4)


def test_one_process_feeds_every_row_and_processes_setting_is_checked(tmp_path):
    """With one process every mesh is one row group; `config.mesh.processes` (per axis, all 1 by default) is
    refused naming the key for an unknown axis, a count below 1 or one that does not divide its axis, and (at the
    mesh) for counts not multiplying to the processes of the run."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices")
    assert process_rows(config_mesh({"data": 2, "fsdp": 2, "tensor": 2})) == RowGroup(0, 1)
    across = validate(tiny_config(tmp_path / "data", mesh=ACROSS)).mesh.processes
    assert (across.data, across.fsdp, across.tensor, across.context) == (1, 1, 1, 2)
    default = validate(tiny_config(tmp_path / "data")).mesh.processes
    assert (default.data, default.fsdp, default.tensor, default.context) == (1, 1, 1, 1)
    assert (
        process_rows(config_mesh({**WHOLE, "processes": {"data": 1, "fsdp": 1, "tensor": 1, "context": 1}})).count == 1
    )
    for processes, match in [
        ({"context": 0}, r"^config\.mesh\.processes\.context=0: expected ≥ 1$"),
        ({"seq": 2}, r"^config\.mesh\.processes\.seq: no such key \(keys of config\.mesh\.processes: data, fsdp, "),
        ({"tensor": 4}, r"^config\.mesh\.processes\.tensor=4: config\.mesh\.tensor=2 is not a multiple of 4$"),
    ]:
        with pytest.raises(ValueError, match=match):
            validate(tiny_config(tmp_path / "data", mesh={**ACROSS, "processes": processes}))
    with pytest.raises(ValueError, match=r"^config\.mesh\.processes=\{'data': 1, .*'context': 2\}: .* 1 processes"):
        config_mesh(validate(tiny_config(tmp_path / "data", mesh=ACROSS)).mesh)


@pytest.mark.slow
def test_context_across_two_processes_trains_as_one_process(tmp_path):
    """2 processes × 4 CPU devices, mesh data 1 × fsdp 2 × tensor 2 × context 2 with the context axis across the
    processes (both feed the whole batch; ring attention's key/value blocks pass between processes), references
    cached (each row scored once, the same cache on both), an evaluation at step 3: the 3 steps' losses and the
    eval loss equal those of 1 process × 8 devices (fsdp 4 × tensor 2, no context) with padded batches, for padded
    and for packed shared-prompt batches (packed = padded: test_packed_training)."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices")
    common = {
        "train.steps": 3,
        "train.eval_every": 3,
        "train.async_checkpointing": False,
        "train.checkpoint_every": 0,
        "reference_mode": "cache",
    }
    preference.train(tiny_config(tmp_path / "data", **common, mesh=WHOLE, **{"data.packing": False}), tmp_path / "one")
    want = _losses(tmp_path / "one")
    assert len(want[0]) == 3 and len(want[1]) == 1 and want[0][0] != want[0][-1]
    for name, layout in {
        "padded": {"data.packing": False},
        "packed": {"data.packing": True, "data.share_prompt": True},
    }.items():
        cfg = tiny_config(tmp_path / "data", **common, mesh=ACROSS, **layout)
        finish(start_processes(write_config(cfg, tmp_path / f"{name}.py"), tmp_path / name))
        got = _losses(tmp_path / name)
        np.testing.assert_allclose(got[0], want[0], atol=1e-5, rtol=0, err_msg=name)
        np.testing.assert_allclose(got[1], want[1], atol=1e-5, rtol=0, err_msg=name)
        if name == "packed":
            assert [m["train/packed"] for m in read_metrics(tmp_path / name) if "train/packed" in m] == [1.0] * 3


def _losses(workdir) -> tuple[list[float], list[float]]:
    metrics = read_metrics(workdir)
    return [m["train/loss"] for m in metrics if "train/loss" in m], [
        m["eval/loss"] for m in metrics if "eval/loss" in m
    ]
