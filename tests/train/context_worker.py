"""One process of the 2-process context-parallel test (tests/train/test_context_parallel.py), run as
`python -m tests.train.context_worker RESULT_NPZ` with 4 CPU devices and RPO_JAX_COORDINATOR / _NUM_PROCESSES /
_PROCESS_ID set: on the mesh {data 2, fsdp 2, context 2} whose context axis spans the two processes
(`make_mesh(..., processes={"context": 2})`, checked device by device), `context_steps` — per-response
log-probs and DPO gradients with the reference in the step for padded, packed and shared-prompt batches of the
Gemma-2-style model, and two SGD train steps on the shared-prompt batch. Process 0 writes the results; the test
compares them with `context_steps(None)` on one device.
"""

from __future__ import annotations

import sys

import jax
import numpy as np

MESH = {"data": 2, "fsdp": 2, "tensor": 1, "context": 2}
STEPS = 2


def on_mesh(tree, shardings):
    """`tree` (host values, the same on every process) as global arrays with `shardings` (a tree like it)."""
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda index, x=np.asarray(x): x[index]),
        tree,
        shardings,
    )


def context_steps(mesh) -> dict[str, np.ndarray]:
    """`{"<layout>/<quantity>[/<i>]": values}` on `mesh` (None: one device): `logps` [B, 2] and the DPO loss's
    gradient leaves `grad/i` for the layouts padded, packed (rows of 32) and shared (shared prompts); for shared
    also each train step's `loss/s` and the parameter leaves after `STEPS` SGD steps `params/i`."""
    import jax.numpy as jnp
    import optax
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec

    from rpo_jax.data.packing import Packing, pack_batch
    from rpo_jax.losses import make_loss
    from rpo_jax.models.sharding import state_shardings
    from rpo_jax.train.step.logprobs import preference_inputs, response_logps
    from rpo_jax.train.step.steps import make_train_step
    from tests.train.test_packed_training import GEMMA2, pair_batch, split

    (graphdef, params, rest), (ref_graphdef, ref_params, ref_rest) = split(GEMMA2, 0), split(GEMMA2, 1)
    assert not jax.tree.leaves(rest) and not jax.tree.leaves(ref_rest)
    if mesh is not None:
        params, ref_params = (on_mesh(p, state_shardings(p, mesh)) for p in (params, ref_params))
    loss_fn = make_loss("dpo")

    def logps(p, b):
        return response_logps(graphdef, p, rest, b, compute_dtype=jnp.float32)

    def loss(p, r, b):
        return loss_fn(preference_inputs(logps(p, b), b, logps(r, b))).loss

    train_step = jax.jit(
        make_train_step(
            graphdef,
            rest,
            loss_fn,
            optax.sgd(0.5),
            compute_dtype=jnp.float32,
            ref_graphdefs=((ref_graphdef, ref_rest),),
        )
    )
    out = {}
    pairs = pair_batch()
    layouts = {"padded": pairs, "packed": pack_batch(pairs, Packing(32))}
    layouts["shared"] = pack_batch(pairs, Packing(32, share_prompt=True))
    for layout, host in layouts.items():
        batch = {k: np.asarray(v) for k, v in host.items()}
        if mesh is not None:
            batch = on_mesh(batch, {k: NamedSharding(mesh, PartitionSpec()) for k in batch})
        got = {"logps": jax.jit(logps)(params, batch), "grad": jax.jit(jax.grad(loss))(params, ref_params, batch)}
        if layout == "shared":  # the train step's program on the layout with the most to it (one compile)
            state = {"params": params, "opt_state": optax.sgd(0.5).init(params), "step": jnp.int32(0)}
            state["rng"] = jax.random.key_data(jax.random.key(0))
            for step in range(STEPS):
                state, metrics = train_step(state, batch, (ref_params,))
                got[f"loss/{step}"] = metrics["loss"]
            got["params"] = state["params"]
        if mesh is not None:
            got = multihost_utils.process_allgather(got, tiled=True)
        for name, value in got.items():
            leaves = jax.tree.leaves(value)
            if name in ("grad", "params"):
                out.update({f"{layout}/{name}/{i}": np.asarray(v) for i, v in enumerate(leaves)})
            else:
                out[f"{layout}/{name}"] = np.asarray(leaves[0])
    return out


def main(result_file: str) -> None:
    from rpo_jax.train.runtime.processes import initialize_from_environment

    assert initialize_from_environment() and jax.process_count() == 2 and jax.local_device_count() == 4
    from rpo_jax.models import make_mesh

    mesh = make_mesh(MESH, processes={"context": 2})
    assert dict(mesh.shape) == MESH, dict(mesh.shape)
    context = list(mesh.axis_names).index("context")
    for index, device in np.ndenumerate(mesh.devices):  # context shard c of every row lives in process c
        assert device.process_index == index[context], (index, device, device.process_index)
    out = context_steps(mesh)
    if jax.process_index() == 0:
        np.savez(result_file, **out)


if __name__ == "__main__":
    main(sys.argv[1])
