"""Attention implementations behind one choice, `ModelConfig.attention` = "auto" | "xla" | "cudnn" | "splash".

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
* "auto": the fastest implementation that supports the call on the default backend — splash on TPU, cuDNN on
  GPU, XLA otherwise or when the kernel cannot express it (`resolve`). An explicit kernel that cannot is a
  one-line ValueError (never a silent fallback).

Masks flow as a description (`MaskSpec`: positions, key validity, segment and parent ids) and each implementation
builds what it needs: the XLA path the dense mask (`dense_mask`), the kernels their own block masks / segment ids.
Windows: on positions in the XLA path (pos[q] - pos[k] < window); the kernels apply them on slots, which is the
same thing whenever nothing is shared (no parents) and every segment's positions count its slots.

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


_INTERPRET = contextvars.ContextVar("rpo_jax_pallas_interpret", default=False)


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
    if implementation == "xla":
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
    else "xla"."""
    if requested not in IMPLEMENTATIONS:
        raise ValueError(f"attention={requested!r} is not one of {IMPLEMENTATIONS}")
    backend = backend or jax.default_backend()
    if requested == "auto":
        kernel = _KERNEL_BY_BACKEND.get(backend)
        return kernel if kernel and unsupported_reason(kernel, backend=backend, **facts) is None else "xla"
    reason = unsupported_reason(requested, backend=backend, **facts)
    if reason is not None:
        raise ValueError(f"attention={requested!r}: {reason}; use 'auto' or 'xla'")
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


def cudnn_attention(q, k, v, spec: MaskSpec, *, window: int | None, scale: float,
                    implementation: str = "cudnn") -> jax.Array:
    """q [N,T,H,hd], k/v [N,T,K,hd] → [N,T,H,hd] by `jax.nn.dot_product_attention` (`implementation`="xla"
    runs JAX's own reference with the same arguments)."""
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation,
                                        **cudnn_arguments(spec, window, scale))


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
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return splash.make_splash_mha(splash.MultiHeadMask([head_mask] * heads), block_sizes=sizes, head_shards=1,
                                  q_seq_shards=1, attn_logits_soft_cap=softcap, interpret=interpret)


def splash_segment_ids(spec: MaskSpec) -> jax.Array:
    """[N,T] int32 segment ids for splash: the row's segment ids (0 without), padding keys → -1.

    A real query sees exactly the real keys of its segment; a padding query sees the padding keys before it
    (itself at least: no empty softmax row) — its output is never read by a real token.
    """
    n, t = spec.positions.shape
    seg = jnp.zeros((n, t), jnp.int32) if spec.segment_ids is None else spec.segment_ids.astype(jnp.int32)
    return seg if spec.valid is None else jnp.where(spec.valid.astype(bool), seg, -1)


def splash_attention(q, k, v, spec: MaskSpec, *, window: int | None, scale: float, softcap: float | None,
                     interpret: bool = False) -> jax.Array:
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


# ----------------------------------------------------------------------------------------------- one call
def attend(implementation: str, q, k, v, *, spec: MaskSpec | None, mask: jax.Array | None, window: int | None,
           scale: float, softcap: float | None, interpret: bool = False) -> jax.Array:
    """Attention by a resolved implementation. "xla" uses the dense `mask` [N,T,S] (already windowed); the
    kernels use `spec` and `window` (None: a global layer)."""
    if implementation == "xla":
        return layers.dot_product_attention(q, k, v, mask, scale=scale, softcap=softcap)
    if implementation == "cudnn":
        return cudnn_attention(q, k, v, spec, window=window, scale=scale)
    if implementation == "splash":
        return splash_attention(q, k, v, spec, window=window, scale=scale, softcap=softcap, interpret=interpret)
    raise ValueError(f"attention={implementation!r} is not a resolved implementation (xla, cudnn, splash)")

