"""Attention implementations behind one choice, `ModelConfig.attention` = "auto" | "xla" | "cudnn" | "splash" |
"blockwise".

* "xla": `layers.dot_product_attention` on a dense boolean [N,T,S] mask — the reference on every backend, and
  the only path that expresses everything (shared-prompt parents, windows on arbitrary positions, KV caches).
* "cudnn": cuDNN flash attention on NVIDIA GPUs through `jax.nn.dot_product_attention(implementation="cudnn")`
  (`cudnn_arguments`): causal by the kernel itself, the sliding window as `local_window_size`, and padding /
  segments / parents as its boolean `mask` (which JAX turns into an additive bias) only when the batch has any.
  Needs bfloat16/float16 and no attention-logit soft-cap (Gemma 2), which the public API cannot express.
* "splash": Pallas splash attention on TPU (`jax.experimental.pallas.ops.tpu.splash_attention`): causal and
  local masks as its static block-sparse masks, segments and padding as its `SegmentIds`, the Gemma 2 soft-cap as
  `attn_logits_soft_cap`, grouped-query heads natively. It cannot express shared-prompt parents (a key in another
  segment) and needs the row length to be a multiple of 128.
* "blockwise": flash-style attention in plain JAX on any backend (`blockwise_attention`): online softmax in
  float32 over blocks of queries × keys (`block_step`, the step ring attention will run per shard too), each
  block's mask built on the fly from the MaskSpec (`block_mask`: everything "xla" expresses but KV caches), the
  soft-cap and grouped-query heads (K/V never repeated), and a custom VJP that recomputes each block's
  probabilities in the backward pass. Memory O(T·block) instead of O(T²): forward + backward of one 8,192-token
  row (H=2, hd=32, float32, CPU) compiles to 16.2 MiB of temporaries against the dense path's 1,540 MiB (scanning
  `block_step` under `jax.checkpoint` with plain autodiff instead: 207 MiB, as every step's accumulator is kept).
  A query block visits only the key blocks at or before it (the mask is causal on slots): about half the FLOPs.
  Same values and gradients as "xla" to float32 rounding, fully masked rows included.
* "auto": the fastest implementation that supports the call on the default backend — splash on TPU, cuDNN on GPU
  when they express it (`resolve`); otherwise, on the CPU and GPUs (float32, a soft-cap), "blockwise" for rows of at
  least `BLOCKWISE_MIN_SEQ_LEN` = 512 tokens and "xla" below; on a TPU where splash cannot run the call (parents,
  rows not a multiple of 128, several devices), "xla" as before (blockwise has not been measured on a TPU; ask for
  it with attention="blockwise"). Measured on the 2-core CPU (tiny Llama, 2 layers, 4 query / 2 key-value heads of
  16, 2 rows, forward + backward, blocks of 128; blockwise vs xla): T=256 20 ms both (but 9 s of compilation against
  6 s), T=512 48 vs 173 ms, T=1024 163 vs 982 ms, T=2048 0.66 vs 3.6 s. An explicit kernel that cannot run the call
  is a one-line ValueError (never a silent fallback).

Masks flow as a description (`MaskSpec`: positions, key validity, segment and parent ids) and each implementation
builds what it needs: the XLA path the dense mask (`dense_mask`), blockwise one block pair's mask at a time
(`block_mask`), the kernels their own block masks / segment ids. Windows: on positions in the XLA and blockwise
paths (pos[q] - pos[k] < window); the kernels apply them on slots, which is the same thing whenever nothing is
shared (no parents) and every segment's positions count its slots.

Shapes: N batch, T query length (= key length: self-attention without caches), H query heads, K key/value heads,
hd head dim.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from rpo_jax.models import layers
from rpo_jax.models.config import ATTENTION_IMPLEMENTATIONS as IMPLEMENTATIONS

# what "auto" tries first on each backend (then "xla")
_KERNEL_BY_BACKEND = {"gpu": "cudnn", "cuda": "cudnn", "tpu": "splash"}
PARENTS_UNSUPPORTED = "splash attention cannot express shared-prompt parent ids (keys in another segment)"
SPLASH_BLOCK_SIZES = (512, 256, 128)  # splash tiles: the largest that divides T (multiples of 128, TPU lanes)
# "blockwise": queries × keys per block (clipped to T) by backend; 512 elsewhere (`blockwise_block_size`)
BLOCKWISE_BLOCK_SIZES = {"cpu": 128}
BLOCKWISE_MIN_SEQ_LEN = 512  # "auto" takes "blockwise" over "xla" from this row length on (see the docstring)


_INTERPRET = contextvars.ContextVar("rpo_jax_pallas_interpret", default=False)
_TARGET: contextvars.ContextVar[tuple[str, int] | None] = contextvars.ContextVar("rpo_jax_target", default=None)


@contextlib.contextmanager
def target_backend(platform: str, device_count: int):
    """Within this block models are traced for `device_count` devices of `platform` ("tpu", "gpu", "cpu") whatever
    JAX's default backend and device count are: "auto" attention (which depends on both) and the blockwise block
    size resolve as they would there. `rpo-plan` compiles for a TPU slice on a CPU host inside it, so that the plan
    is the program the slice runs. Read when a model is traced."""
    token = _TARGET.set((platform, device_count))
    try:
        yield
    finally:
        _TARGET.reset(token)


def current_backend() -> str:
    """The platform models are traced for: `target_backend`'s inside that block, else JAX's default backend."""
    target = _TARGET.get()
    return target[0] if target else jax.default_backend()


def current_device_count() -> int:
    """The devices models are traced for: `target_backend`'s inside that block, else `jax.device_count()`."""
    target = _TARGET.get()
    return target[1] if target else jax.device_count()


@contextlib.contextmanager
def pallas_interpret():
    """Within this block attention="splash" runs the TPU kernel in Pallas interpret mode on any backend (CPU
    tests and debugging; slow). Read when a model is traced, so call the jitted function inside the block."""
    token = _INTERPRET.set(True)
    try:
        yield
    finally:
        _INTERPRET.reset(token)


def interpret_mode() -> bool:
    """Whether `pallas_interpret` is active."""
    return _INTERPRET.get()


class MaskSpec(NamedTuple):
    """What a self-attention mask is made of (a pytree; every field [N,T]).

    positions: int32 token positions; valid: bool, False for padding keys (None: no padding); segment_ids: int
    (None: one sequence per row); parent_ids: int, the segment id a token's segment continues (shared prompts;
    None: none). Key k is visible to query q iff k ≤ q ∧ valid[k] ∧ (seg[k] = seg[q] ∨ seg[k] = parent[q]), and on
    sliding-window layers also pos[q] - pos[k] < window.
    """

    positions: jax.Array
    valid: jax.Array | None = None
    segment_ids: jax.Array | None = None
    parent_ids: jax.Array | None = None


def dense_mask(spec: MaskSpec, window: int | None = None) -> jax.Array:
    """The [N,T,T] bool mask `spec` describes (with the sliding window on positions when `window` is given)."""
    n, t = spec.positions.shape
    index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (n, t))
    mask = layers.attention_mask_bool(index, index, spec.valid, spec.segment_ids, spec.segment_ids, spec.parent_ids)
    if window is not None:
        mask = mask & layers.sliding_window_mask(spec.positions, spec.positions, window)
    return mask


# ----------------------------------------------------------------------------------------------- choosing
def unsupported_reason(
    implementation: str,
    *,
    backend: str,
    dtype,
    seq_len: int,
    has_parents: bool,
    softcap: float | None,
    interpret: bool = False,
    devices: int = 1,
) -> str | None:
    """Why `implementation` cannot run this attention on `backend` (None: it can).

    cudnn: an NVIDIA GPU, bfloat16/float16 compute, no soft-cap. splash: a TPU (or Pallas interpret mode), one
    device (the Pallas call is not wrapped in a shard_map, so XLA could only run it replicated), no parents, T a
    multiple of 128 (its tiles are multiples of 128 lanes, in interpret mode too).
    """
    if implementation in ("xla", "blockwise"):
        return None
    if implementation == "cudnn":
        if backend not in ("gpu", "cuda"):
            return f"cuDNN flash attention needs an NVIDIA GPU (backend is {backend!r})"
        if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            return f"cuDNN flash attention needs bfloat16 or float16 compute (dtype is {jnp.dtype(dtype).name})"
        if softcap is not None:
            return "cuDNN flash attention through jax.nn.dot_product_attention has no attention-logit soft-cap"
        return None
    if implementation == "splash":
        if backend != "tpu" and not interpret:
            return f"splash attention is a TPU kernel (backend is {backend!r})"
        if devices > 1 and not interpret:  # (interpret mode: CPU tests, whose fake devices hold no shards)
            return f"splash attention runs on one device here, not partitioned over {devices} (no shard_map yet)"
        if has_parents:
            return PARENTS_UNSUPPORTED
        if splash_block_size(seq_len) is None:
            return f"splash attention needs the row length ({seq_len}) to be a multiple of 128"
        return None
    raise ValueError(f"attention={implementation!r} is not one of {IMPLEMENTATIONS}")


def resolve(requested: str, *, backend: str | None = None, **facts) -> str:
    """The implementation to run: `requested` itself when it supports the call (`unsupported_reason` with
    `facts`), else a ValueError for an explicit kernel; "auto" → the backend's kernel when it supports the call,
    else (CPU, GPU) "blockwise" for rows of at least `BLOCKWISE_MIN_SEQ_LEN` tokens, else "xla"."""
    if requested not in IMPLEMENTATIONS:
        raise ValueError(f"attention={requested!r} is not one of {IMPLEMENTATIONS}")
    backend = backend or current_backend()
    if requested == "auto":
        kernel = _KERNEL_BY_BACKEND.get(backend)
        if kernel and unsupported_reason(kernel, backend=backend, **facts) is None:
            return kernel
        long_rows = facts["seq_len"] >= BLOCKWISE_MIN_SEQ_LEN
        return "blockwise" if long_rows and backend != "tpu" else "xla"
    reason = unsupported_reason(requested, backend=backend, **facts)
    if reason is not None:
        raise ValueError(f"attention={requested!r}: {reason}; use 'auto', 'xla' or 'blockwise'")
    return requested


# ----------------------------------------------------------------------------------------------- cuDNN
def cudnn_arguments(spec: MaskSpec, window: int | None, scale: float) -> dict:
    """Keyword arguments of `jax.nn.dot_product_attention` for `spec`: is_causal, scale, local_window_size =
    (window - 1, 0) (keys q-window < k ≤ q) when `window` is given, and `mask` [N,1,T,T] — padding, segments and
    parents (and the window on positions instead of slots, when there are parents) — only when `spec` has any."""
    args = {"is_causal": True, "scale": scale}
    if spec.valid is None and spec.segment_ids is None:
        if window is not None:
            args["local_window_size"] = (window - 1, 0)
        return args
    if window is not None and spec.parent_ids is None:
        args["local_window_size"] = (window - 1, 0)
        window = None  # the kernel applies it (slots = positions without parents)
    args["mask"] = dense_mask(spec, window)[:, None]
    return args


def cudnn_attention(
    q, k, v, spec: MaskSpec, *, window: int | None, scale: float, implementation: str = "cudnn"
) -> jax.Array:
    """q [N,T,H,hd], k/v [N,T,K,hd] → [N,T,H,hd] by `jax.nn.dot_product_attention` (`implementation`="xla"
    runs JAX's own reference with the same arguments)."""
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation, **cudnn_arguments(spec, window, scale))


# ----------------------------------------------------------------------------------------------- splash
def splash_block_size(seq_len: int) -> int | None:
    """The splash tile: the largest of `SPLASH_BLOCK_SIZES` dividing `seq_len`; None when none does."""
    return next((b for b in SPLASH_BLOCK_SIZES if seq_len % b == 0), None)


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads: int, seq_len: int, window: int | None, softcap: float | None, interpret: bool):
    block = splash_block_size(seq_len)
    shape = (seq_len, seq_len)
    if window is None:
        head_mask = splash.CausalMask(shape)
    else:  # q - window < k ≤ q
        head_mask = splash.LocalMask(shape, window_size=(window - 1, 0), offset=0)
    sizes = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    return splash.make_splash_mha(
        splash.MultiHeadMask([head_mask] * heads),
        block_sizes=sizes,
        head_shards=1,
        q_seq_shards=1,
        attn_logits_soft_cap=softcap,
        interpret=interpret,
    )


def splash_segment_ids(spec: MaskSpec) -> jax.Array:
    """[N,T] int32 segment ids for splash: the row's segment ids (0 without), padding keys → -1.

    A real query sees exactly the real keys of its segment; a padding query sees the padding keys before it
    (itself at least: no empty softmax row) — its output is never read by a real token.
    """
    n, t = spec.positions.shape
    seg = jnp.zeros((n, t), jnp.int32) if spec.segment_ids is None else spec.segment_ids.astype(jnp.int32)
    return seg if spec.valid is None else jnp.where(spec.valid.astype(bool), seg, -1)


def splash_attention(
    q, k, v, spec: MaskSpec, *, window: int | None, scale: float, softcap: float | None, interpret: bool = False
) -> jax.Array:
    """q [N,T,H,hd], k/v [N,T,K,hd] → [N,T,H,hd] by the splash kernel, one row at a time (vmap).

    scores = softcap·tanh((scale·q)·k / softcap) under causal (or local: q - window < k ≤ q) ∧ same segment.
    """
    if spec.parent_ids is not None:
        raise ValueError(f"attention='splash': {PARENTS_UNSUPPORTED}")
    kernel = _splash_kernel(q.shape[2], q.shape[1], window, softcap, interpret)
    seg = splash_segment_ids(spec)
    qh = (q * jnp.asarray(scale, q.dtype)).transpose(0, 2, 1, 3)  # [N,H,T,hd]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [N,K,T,hd]
    run = lambda qr, kr, vr, sr: kernel(qr, kr, vr, segment_ids=splash.SegmentIds(q=sr, kv=sr))  # noqa: E731
    return jax.vmap(run)(qh, kh, vh, seg).transpose(0, 2, 1, 3)


# ----------------------------------------------------------------------------------------------- blockwise
class BlockCarry(NamedTuple):
    """The online-softmax state of a block of queries after some key blocks (`block_step`).

    m [...,Tq] float32: running max of the visible scores (MASK_VALUE while none was visible); l [...,Tq] float32:
    Σ exp(s - m) over the visible keys seen (0 while none); acc [...,Tq,hd] float32: Σ exp(s - m)·v.
    The attention output of the keys seen so far is acc / l (rows with l = 0 saw no visible key).
    """

    m: jax.Array
    l: jax.Array
    acc: jax.Array


def empty_carry(shape: tuple[int, ...], head_dim: int) -> BlockCarry:
    """The state before any key block: m = MASK_VALUE, l = 0, acc = 0 (`shape` = the query rows' [...,Tq])."""
    return BlockCarry(
        jnp.full(shape, layers.MASK_VALUE, jnp.float32),
        jnp.zeros(shape, jnp.float32),
        jnp.zeros((*shape, head_dim), jnp.float32),
    )


def block_scores(q: jax.Array, k: jax.Array, scale: float, softcap: float | None) -> jax.Array:
    """q [N,K,G,Tq,hd], k [N,K,Sb,hd] → scores [N,K,G,Tq,Sb] float32: s = (q·k)·scale, then softcap·tanh(s/softcap)
    when a soft-cap is given (Gemma 2). Query head k·G + g reads key/value head k (K/V are never repeated)."""
    s = jnp.einsum("nkgqd,nksd->nkgqs", q, k, preferred_element_type=jnp.float32) * scale
    return layers.softcap(s, softcap)


def block_mask(q_slot: jax.Array, k_slot: jax.Array, q: MaskSpec, k: MaskSpec, window: int | None) -> jax.Array:
    """[N,Tq,Sb] bool: which keys of a key block each query of a query block sees, from the MaskSpec pieces of
    both blocks (`q`, `k`: each field [N,Tq] / [N,Sb]; q_slot [Tq] / k_slot [Sb] int32 slots in the row).

    visible = k_slot ≤ q_slot ∧ valid[k] ∧ (seg[k] = seg[q] ∨ seg[k] = parent[q]) [∧ pos[q] - pos[k] < window]:
    the same rule as `dense_mask`, restricted to one block pair.
    """
    n = q.positions.shape[0]
    qi, ki = (jnp.broadcast_to(x, (n, x.shape[0])) for x in (q_slot, k_slot))
    mask = layers.attention_mask_bool(qi, ki, k.valid, q.segment_ids, k.segment_ids, q.parent_ids)
    if window is not None:
        mask = mask & layers.sliding_window_mask(q.positions, k.positions, window)
    return mask


def block_step(
    carry: BlockCarry,
    q: jax.Array,
    k_block: jax.Array,
    v_block: jax.Array,
    mask_block: jax.Array,
    *,
    scale: float,
    softcap: float | None,
) -> BlockCarry:
    """One online-softmax step: the queries' state after one more key/value block.

    carry: `BlockCarry` with m, l [N,K,G,Tq] and acc [N,K,G,Tq,hd]; q [N,K,G,Tq,hd]; k_block, v_block [N,K,Sb,hd];
    mask_block [N,Tq,Sb] bool (`block_mask`). With s = `block_scores` on the visible keys:

        m' = max(m, max_j s_j),  c = exp(m - m'),  p_j = exp(s_j - m') (0 where masked),
        l' = c·l + Σ_j p_j,      acc' = c·acc + Σ_j p_j·v_j.

    All in float32 (p is cast to v's dtype for the p·v product, as the dense path casts its probabilities).
    Masked keys contribute exactly nothing, so the steps of a row's key blocks may come in any order and from
    anywhere: this is the step `blockwise_attention` runs per key block on one device, and the step ring
    attention runs per visiting key/value shard (one implementation for both; the backward step: `block_grads`).
    """
    s = jnp.where(mask_block[:, None, None], block_scores(q, k_block, scale, softcap), layers.MASK_VALUE)
    m = jnp.maximum(carry.m, jnp.max(s, axis=-1))
    p = jnp.where(mask_block[:, None, None], jnp.exp(s - m[..., None]), 0.0)
    c = jnp.exp(carry.m - m)
    pv = jnp.einsum("nkgqs,nksd->nkgqd", p.astype(v_block.dtype), v_block, preferred_element_type=jnp.float32)
    return BlockCarry(m, c * carry.l + jnp.sum(p, axis=-1), c[..., None] * carry.acc + pv)


def block_finish(carry: BlockCarry) -> jax.Array:
    """acc / l [...,Tq,hd] float32: the attention output of a finished state (0 on rows that saw no visible key)."""
    inv = jnp.where(carry.l > 0, 1.0 / jnp.where(carry.l > 0, carry.l, 1.0), 0.0)
    return carry.acc * inv[..., None]


def _pad_rows(x: jax.Array | None, length: int, value=0) -> jax.Array | None:
    """x [N,T,...] padded with `value` to `length` along T (None stays None)."""
    if x is None or x.shape[1] == length:
        return x
    return jnp.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2), constant_values=value)


def _block(x: jax.Array | None, i: jax.Array, size: int, axis: int) -> jax.Array | None:
    return None if x is None else jax.lax.dynamic_slice_in_dim(x, i * size, size, axis=axis)


def _spec_block(spec: MaskSpec, i: jax.Array, size: int) -> MaskSpec:
    return MaskSpec(*(_block(x, i, size, 1) for x in spec))


def _pair_mask(spec: MaskSpec, i, j, size: int, window: int | None) -> jax.Array:
    slots = jnp.arange(size, dtype=jnp.int32)
    return block_mask(
        i * size + slots, j * size + slots, _spec_block(spec, i, size), _spec_block(spec, j, size), window
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _flash(window, scale, softcap, size, q, k, v, spec):
    return _flash_fwd(window, scale, softcap, size, q, k, v, spec)[0]


def _flash_fwd(window, scale, softcap, size, q, k, v, spec):
    """q [N,K,G,Tp,hd], k/v [N,K,Tp,hd] (Tp a multiple of `size`) → (out [N,K,G,Tp,hd] in v's dtype, m, l [N,K,G,Tp]).
    Query block i visits key blocks 0..i only (the mask is causal on slots)."""
    n, kh, g, tp, hd = q.shape

    def query_block(_, i):
        q_i = _block(q, i, size, 3)

        def key_block(j, carry):
            mask = _pair_mask(spec, i, j, size, window)
            return block_step(
                carry, q_i, _block(k, j, size, 2), _block(v, j, size, 2), mask, scale=scale, softcap=softcap
            )

        carry = jax.lax.fori_loop(0, i + 1, key_block, empty_carry((n, kh, g, size), hd))
        return None, (block_finish(carry).astype(v.dtype), carry.m, carry.l)

    _, (out, m, l) = jax.lax.scan(query_block, None, jnp.arange(tp // size))
    out, m, l = (jnp.moveaxis(x, 0, 3).reshape(n, kh, g, tp, *x.shape[5:]) for x in (out, m, l))
    return (out, m, l), (q, k, v, spec, out, m, l)


def block_grads(
    q: jax.Array,
    k_block: jax.Array,
    v_block: jax.Array,
    mask_block: jax.Array,
    dout: jax.Array,
    stats: tuple[jax.Array, jax.Array, jax.Array],
    *,
    scale: float,
    softcap: float | None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The backward counterpart of `block_step`: one block pair's share of the gradients, recomputing its scores.

    q, dout [N,K,G,Tq,hd] (the queries and the output's cotangent); k_block, v_block [N,K,Sb,hd]; mask_block
    [N,Tq,Sb]; stats = (m, 1/l (0 where l = 0), D = rowsum(dout ⊙ out)) [N,K,G,Tq] of the finished forward state.
    With s = `block_scores` and p = exp(s - m)/l (0 where masked), the row's probabilities:

        dv = pᵀ·dout,  ds = p ⊙ (dout·vᵀ - D) [⊙ (1 - (s/cap)²) under a soft-cap],
        dq = scale·ds·k,  dk = scale·dsᵀ·q.

    Returns float32 (dq [N,K,G,Tq,hd], dk, dv [N,K,Sb,hd]): summed over a row's key blocks (dq) and over the query
    blocks that see a key block (dk, dv) they are the gradients of the attention output — on one device here, per
    visiting shard in ring attention.
    """
    m, inv_l, d = stats
    mask = mask_block[:, None, None]
    s = block_scores(q, k_block, scale, softcap)
    p = jnp.where(mask, jnp.exp(jnp.where(mask, s, layers.MASK_VALUE) - m[..., None]), 0.0) * inv_l[..., None]
    dv = jnp.einsum("nkgqs,nkgqd->nksd", p.astype(v_block.dtype), dout, preferred_element_type=jnp.float32)
    dp = jnp.einsum("nkgqd,nksd->nkgqs", dout, v_block, preferred_element_type=jnp.float32)
    ds = p * (dp - d[..., None])
    if softcap is not None:
        ds = ds * (1.0 - jnp.square(s / softcap))
    ds = (ds * scale).astype(q.dtype)
    dq = jnp.einsum("nkgqs,nksd->nkgqd", ds, k_block, preferred_element_type=jnp.float32)
    dk = jnp.einsum("nkgqs,nkgqd->nksd", ds, q, preferred_element_type=jnp.float32)
    return dq, dk, dv


def _flash_bwd(window, scale, softcap, size, residuals, cotangents):
    """`block_grads` over the block pairs: key block j visits query blocks j..last, accumulating its dk, dv; only
    dq [N,K,G,Tp,hd] float32 is carried whole (linear in T)."""
    q, k, v, spec, out, m, l = residuals
    dout = cotangents[0]  # m and l are statistics: their cotangents are ignored (the wrapper only compares m)
    n, kh, g, tp, hd = q.shape
    d = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    stats = (m, jnp.where(l > 0, 1.0 / jnp.where(l > 0, l, 1.0), 0.0), d)

    def key_block(dq, j):
        k_j, v_j = _block(k, j, size, 2), _block(v, j, size, 2)

        def query_block(i, state):
            dq, dk, dv = state
            mask = _pair_mask(spec, i, j, size, window)
            stats_i = tuple(_block(x, i, size, 3) for x in stats)
            dq_i, dk_ij, dv_ij = block_grads(
                _block(q, i, size, 3), k_j, v_j, mask, _block(dout, i, size, 3), stats_i, scale=scale, softcap=softcap
            )
            dq = jax.lax.dynamic_update_slice_in_dim(dq, _block(dq, i, size, 3) + dq_i, i * size, axis=3)
            return dq, dk + dk_ij, dv + dv_ij

        zeros = jnp.zeros((n, kh, size, hd), jnp.float32)
        dq, dk, dv = jax.lax.fori_loop(j, tp // size, query_block, (dq, zeros, zeros))
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(q.shape, jnp.float32), jnp.arange(tp // size))
    dk, dv = (jnp.moveaxis(x, 0, 2).reshape(n, kh, tp, hd) for x in (dk, dv))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_flash.defvjp(_flash_fwd, _flash_bwd)


def blockwise_block_size(backend: str | None = None) -> int:
    """The default block of "blockwise" on `backend` (default: `current_backend`): 128 on the CPU (measured
    fastest there: a 128×128 score block per head stays in cache), 512 on accelerators (fewer, larger loop steps;
    not measured)."""
    return BLOCKWISE_BLOCK_SIZES.get(backend or current_backend(), 512)


def blockwise_attention(
    q, k, v, spec: MaskSpec, *, window: int | None, scale: float, softcap: float | None, block_size: int | None = None
) -> jax.Array:
    """q [N,T,H,hd], k/v [N,T,K,hd] → [N,T,H,hd] by online softmax over blocks of `block_size` (clipped to T;
    None: `blockwise_block_size`) queries × keys (`block_step`), the mask built per block from `spec`
    (`block_mask`); query block i visits key blocks 0..i only. Memory O(T·block), not O(T²).

    T not a multiple of the block: queries and keys are padded internally (padding keys invisible, padding
    queries dropped). A query that sees no key gets what the dense path gives it — the mean of v over all T keys
    (its softmax over T equal MASK_VALUE logits) — with the same gradients (none into q and k). The backward pass
    is a custom VJP that recomputes each block's probabilities (`_flash_bwd`): no [T,T] array either way.
    """
    n, t, h, hd = q.shape
    kh = k.shape[2]
    g = h // kh
    size = min(block_size or blockwise_block_size(), t)
    tp = -(-t // size) * size
    valid = spec.valid if spec.valid is not None or tp == t else jnp.ones((n, t), bool)
    padded = MaskSpec(
        _pad_rows(spec.positions, tp),
        _pad_rows(valid, tp, False),
        _pad_rows(spec.segment_ids, tp),
        _pad_rows(spec.parent_ids, tp),
    )
    qg = _pad_rows(q, tp).reshape(n, tp, kh, g, hd).transpose(0, 2, 3, 1, 4)  # [N,K,G,Tp,hd]
    kt, vt = (_pad_rows(x, tp).transpose(0, 2, 1, 3) for x in (k, v))  # [N,K,Tp,hd]
    out, m, _ = _flash(window, scale, softcap, size, qg, kt, vt, padded)
    # rows with no visible key: the dense path's uniform softmax over all T keys = the mean of v (per kv head)
    seen = jax.lax.stop_gradient(m) > layers.MASK_VALUE
    mean_v = jnp.mean(v, axis=1)[:, :, None, None, :]  # [N,K,1,1,hd]
    out = jnp.where(seen[..., None], out, mean_v.astype(out.dtype))
    return out[:, :, :, :t].transpose(0, 3, 1, 2, 4).reshape(n, t, h, hd)


# ----------------------------------------------------------------------------------------------- one call
def attend(
    implementation: str,
    q,
    k,
    v,
    *,
    spec: MaskSpec | None,
    mask: jax.Array | None,
    window: int | None,
    scale: float,
    softcap: float | None,
    interpret: bool = False,
) -> jax.Array:
    """Attention by a resolved implementation. "xla" uses the dense `mask` [N,T,S] (already windowed); the
    kernels use `spec` and `window` (None: a global layer)."""
    if implementation == "xla":
        return layers.dot_product_attention(q, k, v, mask, scale=scale, softcap=softcap)
    if implementation == "cudnn":
        return cudnn_attention(q, k, v, spec, window=window, scale=scale)
    if implementation == "splash":
        return splash_attention(q, k, v, spec, window=window, scale=scale, softcap=softcap, interpret=interpret)
    if implementation == "blockwise":
        return blockwise_attention(q, k, v, spec, window=window, scale=scale, softcap=softcap)
    raise ValueError(f"attention={implementation!r} is not a resolved implementation (xla, cudnn, splash, blockwise)")
