"""Context parallelism in the train step: a mesh with a `context` axis (rows split over C devices, ring attention)
gives the per-response log-probs, the losses and the parameter gradients of one device, on 8 simulated CPU devices.

Gemma-2-style model (sliding window + attention and final soft-caps, GQA); padded, packed and shared-prompt
batches; K = 2 pairs and K ≤ 4 lists with a masked response; DPO, listwise RPO and MRPO with R = 2 references.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from rpo_jax.data.packing import Packing, pack_batch
from rpo_jax.losses import make_loss
from rpo_jax.models import make_mesh
from rpo_jax.train.step.logprobs import preference_inputs, response_logps
from tests.train.context_worker import context_steps
from tests.train.test_multihost import finish, start_workers
from tests.train.test_packed_training import GEMMA2, list_batch, pair_batch, split, train_losses

ROW = 32  # packed rows: a multiple of 2 × context for context ≤ 8 (the zig-zag layout's chunks)
LAYOUTS = {"packed": Packing(ROW), "shared": Packing(ROW, share_prompt=True)}
TOL = 1e-5


def _layouts(batch):
    return {"padded": batch, **{name: pack_batch(batch, packing) for name, packing in LAYOUTS.items()}}


def _on(mesh, tree):
    """`tree` as arrays on `mesh` (replicated), or plain arrays without a mesh."""
    tree = jax.tree.map(jnp.asarray, tree)
    return tree if mesh is None else jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def _programs(model, cotangent):
    """jit((params, batch) → [B, K] log-probs) and jit((params, batch) → ∇_θ Σ cotangent · log-probs) of the
    model's graph (the references, the same architecture with other weights, reuse the compiled programs)."""
    graphdef, _, rest = model

    def logps(p, b):
        return response_logps(graphdef, p, rest, b, compute_dtype=jnp.float32)

    return jax.jit(logps), jax.jit(lambda p, b: jax.grad(lambda p: jnp.sum(cotangent * logps(p, b)))(p))


def _close(got, want, what):
    err = float(np.max(np.abs(np.asarray(got) - np.asarray(want))))
    bound = TOL * max(1.0, float(np.max(np.abs(np.asarray(want)))))
    assert err <= bound, f"{what}: max |context - one device| = {err:.3g} > {bound:.3g}"


def _check(context, data, layouts=("padded", "packed", "shared")):
    batch = list_batch() if data == "list" else pair_batch()
    models = {name: split(GEMMA2, seed) for name, seed in (("policy", 0), ("ref_a", 1), ("ref_b", 2))}
    cotangent = jnp.asarray(np.random.default_rng(0).normal(size=batch["valid"].shape), jnp.float32)
    logps, pulled = _programs(models["policy"], cotangent)
    mesh = make_mesh({"data": 8 // context, "context": context})
    assert dict(mesh.shape)["context"] == context
    losses = [("dpo", 1)] if data == "pair" else [("rpo_listwise", 1), ("mrpo", 2)]
    for layout in layouts:
        b = _layouts(batch)[layout]
        what = f"context={context} {data} {layout}"
        params = {name: (_on(None, m[1]), _on(mesh, m[1])) for name, m in models.items()}
        inputs = (_on(None, b), _on(mesh, b))
        want, got = (np.asarray(logps(params["policy"][i], inputs[i])) for i in (0, 1))
        assert np.all(want[~batch["valid"]] == 0) and np.all(want[batch["valid"]] < 0)
        _close(got, want, f"{what}: log-probs")
        want_grads, got_grads = (jax.tree.leaves(pulled(params["policy"][i], inputs[i])) for i in (0, 1))
        assert max(float(jnp.abs(g).max()) for g in want_grads) > 1e-3
        for g, w in zip(got_grads, want_grads, strict=True):
            _close(g, w, f"{what}: parameter gradients")
        refs = {r: [np.asarray(logps(params[r][i], inputs[i])) for i in (0, 1)] for r in ("ref_a", "ref_b")}
        for name, num_refs in losses:
            loss_fn = make_loss(name)
            host = {k: jnp.asarray(v) for k, v in b.items()}

            def loss(policy, side, num_refs=num_refs, loss_fn=loss_fn, host=host):
                ref = jnp.stack([jnp.asarray(refs[r][side]) for r in ("ref_a", "ref_b")[:num_refs]], -1)
                return loss_fn(preference_inputs(policy, host, ref[..., 0] if num_refs == 1 else ref)).loss

            want_loss, want_dl = jax.value_and_grad(loss)(jnp.asarray(want), 0)
            got_loss, got_dl = jax.value_and_grad(loss)(jnp.asarray(got), 1)
            assert abs(float(want_loss)) > 1e-3
            _close(got_loss, want_loss, f"{what}: {name} loss")
            _close(got_dl, want_dl, f"{what}: {name} ∂loss/∂log-probs")


@pytest.mark.slow
def test_context_4_equals_one_device_on_lists():
    """K ≤ 4 lists (listwise RPO, MRPO with two references) at context = 4 × data = 2, padded and shared-prompt
    batches (every layout and context size: the next test; the model alone:
    tests/models/test_models_ring_attention.py)."""
    _check(4, "list", layouts=("padded", "shared"))


@pytest.mark.slow
@pytest.mark.parametrize("context,data", [(c, d) for c in (2, 4, 8) for d in ("list", "pair")])
def test_context_equals_one_device(context, data):
    _check(context, data)


@pytest.mark.slow
def test_trainer_with_a_context_axis_takes_the_one_device_steps(tmp_path):
    """`rpo-train` (the demo slice, cached references, evaluation) with mesh {data: 4, context: 2}: the losses and
    the eval loss of mesh {data: 8}."""
    base, base_eval = train_losses(tmp_path, "data", **{"data.packing": False})
    ctx, ctx_eval = train_losses(
        tmp_path, "context", **{"data.packing": False, "mesh": {"data": 4, "fsdp": 1, "tensor": 1, "context": 2}}
    )
    assert len(base) == 3 and len(base_eval) == 1
    np.testing.assert_allclose(ctx, base, atol=1e-5, rtol=0)
    np.testing.assert_allclose(ctx_eval, base_eval, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_context_across_two_processes_equals_one_device(tmp_path):
    """2 processes × 4 CPU devices (Gloo), mesh {data 2, fsdp 2, context 2} with the context axis across the
    processes (`make_mesh(processes={"context": 2})`; the worker checks that context shard c of every row is on
    process c): per-response log-probs and DPO gradients (reference in the step) for padded, packed and
    shared-prompt batches, and the losses and parameters of two SGD train steps on the shared-prompt batch, equal
    one device's (tests/train/context_worker.py)."""
    result = tmp_path / "context.npz"
    procs = start_workers(["-m", "tests.train.context_worker", str(result)])
    finish(procs)
    got = dict(np.load(result))
    want = context_steps(None)
    assert sorted(got) == sorted(want)
    assert {k.split("/")[1] for k in want} == {"logps", "grad", "loss", "params"}
    for key in want:
        _close(got[key], want[key], f"2 processes, {key}")
    assert float(want["shared/loss/1"]) < float(want["shared/loss/0"])  # the steps train
    for layout in ("padded", "packed", "shared"):  # gradients of a size the 1e-5 bound tests (max 0.108)
        assert max(float(np.abs(v).max()) for k, v in want.items() if k.startswith(f"{layout}/grad/")) > 1e-2
