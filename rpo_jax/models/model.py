"""`Decoder`: one generic Flax NNX decoder-only transformer driven by `ModelConfig` (Llama, Gemma 1/2/3, Qwen2,
Qwen3, Mistral).

Layer parameters are stacked along a leading `layers` axis and run with `jax.lax.scan`, so compile time does
not grow with depth; per-layer differences (sliding vs global attention, rope base) are scanned arrays, not
Python branches. An optional `jax.checkpoint` policy (config.remat) wraps the scanned layer.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx

from rpo_jax.models import attention, layers, ring_attention
from rpo_jax.models.config import FULL_ATTENTION, SLIDING_ATTENTION, ModelConfig, embedding_scale
from rpo_jax.models.sharding import Rules, constrain, state_shardings


def scan_unroll(config) -> int:
    """Layers per iteration of the layer scan: `config.scan_unroll` (at most the depth), or 1 when the layers are
    rematerialised (`config.remat` other than "none"). XLA schedules the U unrolled copies of a rematerialised
    layer together, so their recomputed activations are all alive at once: fully unrolled, remat saves nothing
    (SmolLM2-135M's train step, 30 layers, 4,096 slots, remat="full": 9.37 GiB of temporaries unrolled ×30 against
    2.77 GiB in a rolled scan; XLA's memory analysis). Either way the same values."""
    return 1 if config.remat != "none" else min(config.scan_unroll, config.num_layers)


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_saveable": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def _param(rngs: nnx.Rngs, shape, axes, dtype, init: str) -> nnx.Param:
    if init == "zeros":
        value = jnp.zeros(shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        # drawn flat then reshaped: same distribution, and XLA compiles a 1-D threefry several times faster
        flat = jax.random.normal(rngs.params(), (math.prod(shape),), jnp.float32)
        value = (0.02 * flat).reshape(shape).astype(dtype)
    return nnx.Param(value, out_sharding=tuple(axes))


class DecoderLayers(nnx.Module):
    """Stacked per-layer parameters, leading axis = layer.

    q_proj [L,D,H,hd], k_proj/v_proj [L,D,K,hd], o_proj [L,H,hd,D], gate_proj/up_proj [L,D,F], down_proj [L,F,D],
    attn_in_norm/mlp_in_norm [L,D] (+ attn_out_norm/mlp_out_norm for sandwich norms, q_norm/k_norm [L,hd],
    q_bias [L,H,hd] and k_bias/v_bias [L,K,hd] for q/k/v biases).
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, param_dtype):
        c = config
        nl, d, h, k, hd, f = c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
        norm_init = "zeros" if c.norm_plus_one else "ones"
        p = lambda shape, axes, init="normal": _param(rngs, shape, axes, param_dtype, init)  # noqa: E731
        self.q_proj = p((nl, d, h, hd), ("layers", "embed", "heads", "head_dim"))
        self.k_proj = p((nl, d, k, hd), ("layers", "embed", "kv_heads", "head_dim"))
        self.v_proj = p((nl, d, k, hd), ("layers", "embed", "kv_heads", "head_dim"))
        self.o_proj = p((nl, h, hd, d), ("layers", "heads", "head_dim", "embed"))
        self.gate_proj = p((nl, d, f), ("layers", "embed", "mlp"))
        self.up_proj = p((nl, d, f), ("layers", "embed", "mlp"))
        self.down_proj = p((nl, f, d), ("layers", "mlp", "embed"))
        self.attn_in_norm = p((nl, d), ("layers", "norm"), norm_init)
        self.mlp_in_norm = p((nl, d), ("layers", "norm"), norm_init)
        if c.sandwich_norms:
            self.attn_out_norm = p((nl, d), ("layers", "norm"), norm_init)
            self.mlp_out_norm = p((nl, d), ("layers", "norm"), norm_init)
        if c.qk_norm:
            self.q_norm = p((nl, hd), ("layers", "norm"), norm_init)
            self.k_norm = p((nl, hd), ("layers", "norm"), norm_init)
        if c.qkv_bias:
            self.q_bias = p((nl, h, hd), ("layers", "heads", "head_dim"), "zeros")
            self.k_bias = p((nl, k, hd), ("layers", "kv_heads", "head_dim"), "zeros")
            self.v_bias = p((nl, k, hd), ("layers", "kv_heads", "head_dim"), "zeros")

    def arrays(self) -> dict[str, jax.Array]:
        """name → stacked array, for scanning."""
        return {name: v[...] for name, v in vars(self).items() if isinstance(v, nnx.Param)}


def dense_weight(a: jax.Array | qwix.QArray) -> jax.Array:
    """A scanned weight as a float array: `a` itself, or a `qwix.QArray` (one layer of a base quantized by
    `rpo_jax.models.quantize`) dequantized, ŵ = q · s in the scales' dtype (float32)."""
    return qwix.dequantize(a) if isinstance(a, qwix.QArray) else a


def decoder_layer(
    config: ModelConfig,
    x: jax.Array,
    p: dict[str, jax.Array],
    attend: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
    cos: jax.Array,
    sin: jax.Array,
    kv_cache: tuple[jax.Array, jax.Array] | None = None,
    cache_index: jax.Array | None = None,
    return_kv: bool = False,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """One pre-norm block: x + attn(norm(x)) then + mlp(norm(x)) (Gemma 2/3: norms on both sides).

    x [N,T,D]; p: this layer's parameters; attend(q [N,T,H,hd], k, v [N,S,K,hd]) → [N,T,H,hd]: the attention
    with this layer's mask (`xla_attend` / `kernel_attend`); cos/sin [N,T,hd]. With `kv_cache` (k, v
    [N,S,K,hd]) the new keys/values are written at slots cache_index .. cache_index+T-1 (a scalar) and
    attention runs over the whole cache (its mask says which slots are visible). Without a cache and with
    `return_kv`, this call's rotated keys/values (k, v) [N,T,K,hd] come back in the cache's place (prefill).
    Returns (x, updated cache, this call's keys/values or None).
    """
    c, dtype = config, x.dtype
    norm = lambda y, w: layers.rms_norm(y, w, c.rms_norm_eps, plus_one=c.norm_plus_one)  # noqa: E731
    w = {name: dense_weight(a).astype(dtype) if a.ndim > 1 else a for name, a in p.items()}
    # LoRA factors scanned beside their weights as "<name>_lora_a" / "<name>_lora_b" (see Decoder.adapter_arrays)
    # (and, in a training step with LoRA dropout, "<name>_lora_key" and "lora_keep": see rpo_jax.models.lora)
    adapters = {n[: -len("_lora_a")]: (a, w[n[: -len("_a")] + "_b"]) for n, a in w.items() if n.endswith("_lora_a")}
    if "lora_keep" in w:
        adapters = {n: (a, b, (w[f"{n}_lora_key"], w["lora_keep"])) for n, (a, b) in adapters.items()}

    def linear(y, name, project):
        out = project(y, w[name])
        return out if name not in adapters else out + layers.lora_delta(y, *adapters[name])

    h = norm(x, w["attn_in_norm"])
    # activation shardings (no-ops without a mesh): rows over data×fsdp, heads over tensor, the sequence over
    # context (a mesh with a context axis: ring attention)
    q = constrain(linear(h, "q_proj", layers.project_in), ("batch", "sequence", "heads", None))
    k = constrain(linear(h, "k_proj", layers.project_in), ("batch", "sequence", "kv_heads", None))
    v = constrain(linear(h, "v_proj", layers.project_in), ("batch", "sequence", "kv_heads", None))
    if c.qkv_bias:
        q, k, v = q + w["q_bias"], k + w["k_bias"], v + w["v_bias"]
    if c.qk_norm:
        q, k = norm(q, w["q_norm"]), norm(k, w["k_norm"])
    q, k = layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)
    new_cache = (k, v) if return_kv else None
    if kv_cache is not None:
        k_all, v_all = kv_cache
        k_all = jax.lax.dynamic_update_slice_in_dim(k_all, k.astype(k_all.dtype), cache_index, axis=1)
        v_all = jax.lax.dynamic_update_slice_in_dim(v_all, v.astype(v_all.dtype), cache_index, axis=1)
        new_cache, k, v = (k_all, v_all), k_all.astype(dtype), v_all.astype(dtype)
    attn = attend(q, k, v)
    attn = constrain(attn, ("batch", "sequence", "heads", None))
    attn = constrain(linear(attn, "o_proj", layers.project_out), ("batch", "sequence", None))
    if c.sandwich_norms:
        attn = norm(attn, w["attn_out_norm"])
    x = x + attn

    h = norm(x, w["mlp_in_norm"])
    mlp = layers.gated_mlp(h, w["gate_proj"], w["up_proj"], w["down_proj"], c.activation, adapters)
    if c.sandwich_norms:
        mlp = norm(mlp, w["mlp_out_norm"])
    return constrain(x + mlp, ("batch", "sequence", None)), new_cache


def xla_attend(config: ModelConfig, mask: jax.Array) -> Callable:
    """attend(q, k, v) on the XLA path with the dense mask [N,T,S] bool."""
    return functools.partial(
        attention.attend,
        "xla",
        spec=None,
        mask=mask,
        window=None,
        scale=config.attention_scale,
        softcap=config.attn_logit_softcap,
    )


def kernel_attend(
    config: ModelConfig,
    implementation: str,
    spec: attention.MaskSpec,
    is_sliding: jax.Array,
    interpret: bool,
    context: tuple | None = None,
) -> Callable:
    """attend(q, k, v) by a fused kernel (`attention.attend`) for one layer of the scan: the sliding window when
    the (scanned, traced) `is_sliding` says so — a `lax.cond` between the two kernels when the model mixes global
    and sliding layers. implementation="ring": `ring_attention.context_attention` with `context` = (mesh, slots
    [T] of the row's layout)."""
    c = config
    if implementation == "ring":
        mesh, slots = context
        run = functools.partial(
            ring_attention.context_attention,
            spec=spec,
            slots=slots,
            mesh=mesh,
            scale=c.attention_scale,
            softcap=c.attn_logit_softcap,
        )
    else:
        run = functools.partial(
            attention.attend,
            implementation,
            spec=spec,
            mask=None,
            scale=c.attention_scale,
            softcap=c.attn_logit_softcap,
            interpret=interpret,
        )
    kinds = set(c.layer_types)
    if kinds == {FULL_ATTENTION}:
        return functools.partial(run, window=None)
    if kinds == {SLIDING_ATTENTION}:
        return functools.partial(run, window=c.sliding_window)
    return lambda q, k, v: jax.lax.cond(
        is_sliding, functools.partial(run, window=c.sliding_window), functools.partial(run, window=None), q, k, v
    )


class Decoder(nnx.Module):
    """Decoder-only transformer. `model(tokens, attention_mask, positions, segment_ids, parent_ids)` → logits
    [N,T,V] f32.

    Attention: causal; keys masked where `attention_mask` is False; with `segment_ids` a token only attends to
    its own segment (packing) and, with `parent_ids`, to its parent segment's (a shared prompt). Default positions:
    per segment, counting only real tokens (cumsum(mask) - 1), so
    left padding, right padding and packing give the same per-token results as the sequence alone.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=None):
        c = config
        self.config = c
        self.dtype = jnp.dtype(dtype)
        self.param_dtype = jnp.dtype(param_dtype or dtype)
        pd = self.param_dtype
        self.embed = _param(rngs, (c.vocab_size, c.hidden_size), ("vocab", "embed"), pd, "normal")
        self.layers = DecoderLayers(c, rngs=rngs, param_dtype=pd)
        self.final_norm = _param(rngs, (c.hidden_size,), ("norm",), pd, "zeros" if c.norm_plus_one else "ones")
        if not c.tie_word_embeddings:
            # [V, D] like the embedding (and Hugging Face's lm_head.weight): vocabulary chunks are row slices
            self.lm_head = _param(rngs, (c.vocab_size, c.hidden_size), ("vocab", "embed"), pd, "normal")
        self._rope_types = tuple(sorted(set(c.layer_types)))

    # ----------------------------------------------------------------- pieces reused by generation / log-probs
    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """[N,T] → [N,T,D] in the compute dtype (× sqrt(D) cast to dtype for Gemma)."""
        x = constrain(jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype), ("batch", "sequence", None))
        if self.config.scale_embeddings:
            x = x * jnp.asarray(embedding_scale(self.config), self.dtype)
        return x

    def unembedding(self) -> jax.Array:
        """The output projection as rows [V,D] (the embedding itself when tied), in the compute dtype.

        logits = hidden · unembedding()ᵀ.
        """
        table = self.embed if self.config.tie_word_embeddings else self.lm_head
        return table[...].astype(self.dtype)

    def unembed(self, hidden: jax.Array) -> jax.Array:
        """hidden [...,D] → logits [...,V] float32 (final soft-cap applied)."""
        logits = jnp.einsum("...d,vd->...v", hidden, self.unembedding(), preferred_element_type=jnp.float32)
        return layers.softcap(logits, self.config.final_logit_softcap)

    def adapter_arrays(self) -> dict[str, jax.Array]:
        """Scanned LoRA factors of an attached, enabled adapter set (`rpo_jax.models.lora.attach_lora` sets
        `self.lora`): "<target>_lora_a" [L,*in,r] and "<target>_lora_b" [L,r,*out] with alpha/rank folded into B;
        {} without adapters or while they are switched off (then the program is exactly the base model's)."""
        adapters = getattr(self, "lora", None)
        return {} if adapters is None or not adapters.enabled else adapters.arrays()

    def _layer_constants(self):
        c = self.config
        sliding = jnp.asarray([t == SLIDING_ATTENTION for t in c.layer_types])
        rope_index = jnp.asarray([self._rope_types.index(t) for t in c.layer_types], jnp.int32)
        return sliding, rope_index

    def run_layers(
        self,
        x: jax.Array,
        positions: jax.Array,
        mask: jax.Array | None,
        window_mask: jax.Array | None,
        kv_caches: dict[str, tuple[jax.Array, jax.Array]] | None = None,
        cache_index: dict[str, jax.Array] | None = None,
        return_kv: bool = False,
        kernel: tuple[str, attention.MaskSpec, bool] | None = None,
    ):
        """Scans all layers. x [N,T,D]; mask/window_mask [N,T,S] bool (window_mask = mask ∧ sliding window).

        `kernel` = (implementation, mask description, Pallas interpret mode[, (mesh, slots)]): attention by that
        fused kernel (`attention.attend`, "cudnn" / "splash" / "blockwise"; "ring" with the mesh and the row's
        slots) instead of the dense masks (then None); no caches.

        Decoding with `kv_caches`: layer type ("full_attention" / "sliding_attention", one entry per type the model
        has) → (k, v) [L_type,N,S_type,K,hd], stacked over that type's layers in order; each layer writes its new
        keys/values at slot `cache_index[type]` of its own cache; `mask` [N,T,S_full] is over the full-attention
        caches' slots and `window_mask` [N,T,S_sliding] over the sliding ones' (e.g. a ring buffer's).
        `return_kv` (without caches): every layer's rotated keys/values (k, v) [L,N,T,K,hd] come back (prefill).
        Returns (x after the final norm, updated caches / keys and values / None).
        """
        c = self.config
        inv_freqs = [layers.rope_inv_freq(c.rope_by_type[t], c.head_dim) for t in self._rope_types]
        tables = [layers.rope_tables(positions, jnp.asarray(f), self.dtype) for f in inv_freqs]
        cos_tab = jnp.stack([t[0] for t in tables])
        sin_tab = jnp.stack([t[1] for t in tables])
        sliding, rope_index = self._layer_constants()
        # index of each layer among the layers of its type (its slot in that type's cache stack)
        index_in_type = jnp.asarray([c.layer_types[:i].count(t) for i, t in enumerate(c.layer_types)], jnp.int32)

        def body(carry, xs):
            h, caches = carry
            p, is_sliding, r, j = xs
            if caches is None:
                if kernel is not None:
                    attend = kernel_attend(c, *kernel[:2], is_sliding, *kernel[2:])
                else:
                    attend = xla_attend(c, mask if window_mask is None else jnp.where(is_sliding, window_mask, mask))
                h, kv = decoder_layer(c, h, p, attend, cos_tab[r], sin_tab[r], return_kv=return_kv)
                return (h, None), kv

            def attend(kind, m):
                def run(h, caches):
                    k_all, v_all = caches[kind]
                    h, (k, v) = decoder_layer(
                        c, h, p, xla_attend(c, m), cos_tab[r], sin_tab[r], (k_all[j], v_all[j]), cache_index[kind]
                    )
                    return h, {**caches, kind: (k_all.at[j].set(k), v_all.at[j].set(v))}

                return run

            if len(caches) == 1:
                (kind,) = caches
                h, caches = attend(kind, window_mask if kind == SLIDING_ATTENTION else mask)(h, caches)
            else:
                h, caches = jax.lax.cond(
                    is_sliding, attend(SLIDING_ATTENTION, window_mask), attend(FULL_ATTENTION, mask), h, caches
                )
            return (h, caches), None

        scanned = self.layers.arrays() | self.adapter_arrays()
        unroll = scan_unroll(c)
        if c.remat != "none":
            body = jax.checkpoint(body, policy=_REMAT_POLICIES[c.remat], prevent_cse=False)
        elif any(isinstance(a, qwix.QArray) for a in scanned.values()):
            # a quantized base (rpo_jax.models.quantize): recompute the dequantized weights in the backward pass
            # instead of keeping every layer's float copy; matmul outputs are saved
            body = jax.checkpoint(body, policy=_REMAT_POLICIES["dots"], prevent_cse=False)
            unroll = 1  # as `scan_unroll` says for remat
        (x, new_caches), kv = jax.lax.scan(
            body, (x, kv_caches), (scanned, sliding, rope_index, index_in_type), unroll=unroll
        )
        x = layers.rms_norm(x, self.final_norm[...], c.rms_norm_eps, plus_one=c.norm_plus_one)
        return x, (new_caches if kv_caches is not None else kv)

    def hidden_states(
        self,
        tokens: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        parent_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Final-normed hidden states [N,T,D] (compute dtype).

        tokens [N,T]; attention_mask [N,T] (False: padding); positions [N,T] (default: per segment, counting real
        tokens); segment_ids [N,T] (packing); parent_ids [N,T] (shared prompts, needs segment_ids: the segment id
        of the prompt that the token's segment continues, or its own segment id). Key k is visible to query q iff
        k ≤ q ∧ k is not padding ∧ (seg[k] = seg[q] ∨ seg[k] = parent[q]); sliding windows on positions
        (pos[q] - pos[k] < window). Attention by `config.attention` (`attention.resolve`: "auto" takes the
        backend's fused kernel when it expresses this call, else XLA).
        """
        c = self.config
        n, t = tokens.shape
        if parent_ids is not None and segment_ids is None:
            raise ValueError("parent_ids needs segment_ids (a parent is a segment id)")
        if positions is None:
            positions = layers.default_positions(attention_mask, segment_ids, (n, t))
        spec = attention.MaskSpec(positions, attention_mask, segment_ids, parent_ids)
        mesh = ring_attention.context_mesh(tokens)
        if mesh is not None:
            x, slots = self._context_hidden_states(tokens, spec, mesh)
            return x[:, np.argsort(slots)]
        interpret = attention.interpret_mode()
        implementation = attention.resolve(
            c.attention,
            dtype=self.dtype,
            seq_len=t,
            has_parents=parent_ids is not None,
            softcap=c.attn_logit_softcap,
            interpret=interpret,
            devices=attention.current_device_count(),
        )
        x = self.embed_tokens(tokens)
        if implementation != "xla":
            x, _ = self.run_layers(x, positions, None, None, kernel=(implementation, spec, interpret))
            return x
        mask = attention.dense_mask(spec)
        window_mask = None
        if SLIDING_ATTENTION in c.layer_types:
            window_mask = mask & layers.sliding_window_mask(positions, positions, c.sliding_window)
        x, _ = self.run_layers(x, positions, mask, window_mask)
        return x

    def _context_hidden_states(self, tokens: jax.Array, spec: attention.MaskSpec, mesh):
        """(hidden [N,T,D] in the zig-zag layout, slots [T] numpy int32) with the row split over the mesh's
        context axis (C devices): the row is put in the zig-zag layout (`ring_attention.zigzag_slots`: T a
        multiple of 2C) and every layer runs on T/C tokens per device with ring attention."""
        c = self.config
        if c.attention not in ("auto", "xla", "blockwise"):
            raise ValueError(
                f"attention={c.attention!r} does not compose with mesh.context > 1 yet (ring attention runs XLA "
                "blocks per shard); use 'auto'"
            )
        slots = ring_attention.zigzag_slots(tokens.shape[1], mesh.shape[ring_attention.CONTEXT_AXIS])
        laid = attention.MaskSpec(*(None if x is None else x[:, slots] for x in spec))
        x = self.embed_tokens(tokens[:, slots])
        x, _ = self.run_layers(x, laid.positions, None, None, kernel=("ring", laid, False, (mesh, jnp.asarray(slots))))
        return x, slots

    def context_hidden_states(
        self,
        tokens: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        parent_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, np.ndarray]:
        """On a mesh with a context axis: (final-normed hidden states [N,T,D] in the zig-zag layout, still split
        over the context devices, and slots [T]: the row slot of each laid-out position). `hidden_states` is
        hidden[:, argsort(slots)]; per-token work (the output head) can run in the layout, one shard per device.
        Arguments as in `hidden_states`."""
        n, t = tokens.shape
        mesh = ring_attention.context_mesh(tokens)
        if mesh is None:
            raise ValueError("context_hidden_states needs tokens on a mesh with a context axis of more than 1")
        if positions is None:
            positions = layers.default_positions(attention_mask, segment_ids, (n, t))
        if parent_ids is not None and segment_ids is None:
            raise ValueError("parent_ids needs segment_ids (a parent is a segment id)")
        spec = attention.MaskSpec(positions, attention_mask, segment_ids, parent_ids)
        return self._context_hidden_states(tokens, spec, mesh)

    def __call__(
        self,
        tokens: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        parent_ids: jax.Array | None = None,
    ) -> jax.Array:
        """tokens [N,T] int32 → logits [N,T,V] float32 (arguments as in `hidden_states`)."""
        return self.unembed(self.hidden_states(tokens, attention_mask, positions, segment_ids, parent_ids))


def create_model(
    config: ModelConfig,
    *,
    rngs: nnx.Rngs,
    dtype=jnp.float32,
    param_dtype=None,
    mesh: jax.sharding.Mesh | None = None,
    rules: Rules | None = None,
) -> Decoder:
    """A randomly initialised `Decoder` (normal(0.02) weights, identity norms).

    Initialisation runs in one jit; with `mesh` its outputs are the rule-given shardings (jit `out_shardings`).

    Args:
        config: the architecture.
        rngs: the random streams, e.g. `nnx.Rngs(0)`.
        dtype: the compute dtype.
        param_dtype: the parameters' dtype (`None`: `dtype`).
        mesh: place the parameters on this mesh by `rules` (`None`: the default device).
        rules: logical axis → mesh axis; default `DEFAULT_RULES`.

    Returns:
        The `Decoder`.
    """
    key = rngs.params()
    build = lambda k: Decoder(config, rngs=nnx.Rngs(params=k), dtype=dtype, param_dtype=param_dtype)  # noqa: E731
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: build(key))
        graphdef, abstract_state = nnx.split(abstract)
        shardings = None if mesh is None else state_shardings(abstract_state, mesh, rules)
        state = jax.jit(lambda k: nnx.state(build(k)), out_shardings=shardings)(key)
    return nnx.merge(graphdef, state)
