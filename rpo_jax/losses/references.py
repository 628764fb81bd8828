"""Reference combiners: which reference log-prob ``ℓ_ref [B, K]`` a loss compares the policy against.

* ``"primary"``: reference 0 (``ref_logps[..., 0]`` when there is a reference axis).
* ``"mrpo"``: the MRPO virtual reference of Le et al., *Multi-Reference Preference Optimization for Large
  Language Models* (arXiv:2405.16388, AAAI 2025): the weighted harmonic mean of the references,

      log π̃(y|x) = −logsumexp_k( log α_k − ℓ̂_k(y|x) ),

  where ``ℓ̂_k`` are the CTRO-clipped reference log-probs and ``α`` the fixed or ARWC weights. Because it is just a
  reference log-prob, it composes with every RPO distance, with the listwise loss and with ``K > 2``.

Choices made where the authors' code (github.com/thaihungle/MRPO, ``trainer_mref.py``, a K = 2, R = 2 demo) is
specific, generalised here to any ``K`` and ``R``:

* **CTRO clipping** (``epsilon``): each non-primary reference ``k ≥ 1`` is clipped into a band around the primary,
  ``ℓ̂_k = clip(ℓ_k, (1+ε_y)·ℓ_0, (1−ε_y)·ℓ_0)`` (log-probs are ≤ 0; the band is ordered so it is valid for any
  sign). ``epsilon_mode="fixed"``: ``ε_y = ε``. ``epsilon_mode="adaptive"`` (the authors' default): per example,
  ε is split over the responses in proportion to ``|m_y|``, the mean over the ``R`` references of ``ℓ_k(y)``:
  ``ε_y = ε · (K_valid/2) · |m_y| / Σ_{valid y'} |m_y'|`` — for ``K = 2`` exactly the code's
  ``ε_w = ε·|m_w|/(|m_w|+|m_l|)``, ``ε_l = ε − ε_w``. ``epsilon=None`` disables clipping.
* **ARWC weights** (``alpha=None``), per example, from each reference's margin on the *unclipped* log-probs,
  ``M_k = mean_{valid ordered pairs i≠j} |ℓ_k(y_i) − ℓ_k(y_j)|`` (for K = 2 the margin ``|ℓ_k(y_w) − ℓ_k(y_l)|``),
  ``δ = 1e-6``; ``arwc`` picks how the margins become weights:

  - ``"own_margin"`` (default; the paper's description, MATH.md): each reference weighted by its *own* margin,
    ``α_k = (M_k + δ) / Σ_j (M_j + δ)``, for any ``R``.
  - ``"authors_code"``: the authors' code (``trainer_mref.py``, ``MRefDPOTrainer.get_batch_loss_metrics``, adaptive
    ``alpha < 0``), ``R = 2`` only: ``alpha = |a1| / (|a1| + |a2| + 1e-6)`` with ``a1`` the margin of the second
    (clipped) reference and ``a2`` that of the primary, and the virtual reference
    ``ℓ̂_1 + ℓ_0 − log(alpha·e^{ℓ̂_1} + (1 − alpha)·e^{ℓ_0})``, i.e. ``1/π̃ = alpha/π_0 + (1 − alpha)/π̂_1``: each
    reference is weighted by the *other* reference's margin, ``α_0 = M_1 / (M_0 + M_1 + δ)``,
    ``α_1 = 1 − α_0``. (The code's ``K = 2`` margins ``|a|`` are generalised to ``M_k`` as above.) The swap is in
    the code's MRPO branch only; its multi-DPO baseline (``mref_naive``) weights each reference's DPO term by its
    own margin, as ``multi_dpo`` does here (which therefore has no ``arwc`` option).

  Fixed ``alpha``: a sequence of ``R`` non-negative weights summing to 1 (``arwc`` does not apply).

Limits (tested): one-hot ``α`` with no clipping ⇒ that reference; identical references ⇒ that reference;
``ε = 0`` ⇒ the primary reference.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

__all__ = [
    "REFERENCE_COMBINERS",
    "EPSILON_MODES",
    "ARWC_DELTA",
    "ARWC_MODES",
    "primary_reference",
    "ctro_clip",
    "arwc_margins",
    "arwc_weights",
    "virtual_reference",
]

REFERENCE_COMBINERS = ("primary", "mrpo")
EPSILON_MODES = ("adaptive", "fixed")
ARWC_DELTA = 1e-6
ARWC_MODES = ("own_margin", "authors_code")


def primary_reference(ref_logps: jax.Array) -> jax.Array:
    """The primary reference's log-probs.

    Args:
        ref_logps: `[B, K, R]` or `[B, K]` reference log-probs.

    Returns:
        `[B, K]`: reference 0 of `[B, K, R]`, or `ref_logps` itself when it is `[B, K]`.
    """
    return ref_logps[..., 0] if ref_logps.ndim == 3 else ref_logps


def ctro_clip(ref_logps: jax.Array, valid: jax.Array, epsilon: float, epsilon_mode: str) -> jax.Array:
    """CTRO clipping of references `1..R-1` around reference 0 (MRPO; see the module docstring).

    Args:
        ref_logps: `[B, K, R]` reference log-probs (index 0 = primary).
        valid: `[B, K]` bool.
        epsilon: the clipping rate ε.
        epsilon_mode: `"adaptive"` (ε split over an example's responses as the authors' code does) or `"fixed"`.

    Returns:
        `[B, K, R]` with references `1..R-1` clipped into `[(1+ε_y)ℓ_0, (1−ε_y)ℓ_0]`.
    """
    primary = ref_logps[..., 0]
    if epsilon_mode == "fixed":
        eps = jnp.full(primary.shape, epsilon, jnp.float32)
    elif epsilon_mode == "adaptive":
        scale = jnp.where(valid, jnp.abs(jnp.mean(ref_logps, axis=-1)), 0.0)
        total = jnp.sum(scale, axis=-1, keepdims=True)
        num_valid = jnp.sum(valid, axis=-1, keepdims=True).astype(jnp.float32)
        share = scale / jnp.where(total > 0, total, 1.0)
        eps = jnp.where(total > 0, epsilon * (num_valid / 2.0) * share, epsilon)
    else:
        raise ValueError(f"epsilon_mode must be one of {EPSILON_MODES}, got {epsilon_mode!r}")
    edge_a, edge_b = (1.0 + eps) * primary, (1.0 - eps) * primary
    low, high = jnp.minimum(edge_a, edge_b), jnp.maximum(edge_a, edge_b)
    clipped = jnp.clip(ref_logps, low[..., None], high[..., None])
    return clipped.at[..., 0].set(primary)


def arwc_margins(ref_logps: jax.Array, valid: jax.Array) -> jax.Array:
    """``M [B, R]``: per reference, the mean over valid ordered pairs ``i ≠ j`` of ``|ℓ_k(y_i) − ℓ_k(y_j)|``."""
    num_k = valid.shape[-1]
    pairs = valid[:, :, None] & valid[:, None, :] & ~jnp.eye(num_k, dtype=bool)[None]
    gaps = jnp.abs(ref_logps[:, :, None, :] - ref_logps[:, None, :, :])  # [B, K, K, R]
    num_pairs = jnp.maximum(jnp.sum(pairs, axis=(1, 2)), 1).astype(jnp.float32)
    return jnp.sum(jnp.where(pairs[..., None], gaps, 0.0), axis=(1, 2)) / num_pairs[:, None]


def arwc_weights(ref_logps: jax.Array, valid: jax.Array, arwc: str = "own_margin") -> jax.Array:
    """ARWC weights from the margins `M_k` of `arwc_margins` (see the module docstring).

    `arwc="own_margin"`: `α_k = (M_k + δ) / Σ_j (M_j + δ)`. `arwc="authors_code"` (`R = 2` only, else
    `ValueError`): `α_0 = M_1 / (M_0 + M_1 + δ)`, `α_1 = 1 − α_0`.

    Args:
        ref_logps: `[B, K, R]` unclipped reference log-probs.
        valid: `[B, K]` bool.
        arwc: `"own_margin"` or `"authors_code"`.

    Returns:
        `[B, R]` weights summing to 1 per example.
    """
    margins = arwc_margins(ref_logps, valid)
    if arwc == "own_margin":
        margins = margins + ARWC_DELTA
        return margins / jnp.sum(margins, axis=-1, keepdims=True)
    if arwc == "authors_code":
        num_r = ref_logps.shape[-1]
        if num_r != 2:
            raise ValueError(
                f"arwc='authors_code' is the authors' two-reference weighting (each reference weighted by the other's "
                f"margin) and needs exactly R = 2 references, got R = {num_r}; use arwc='own_margin' for R != 2"
            )
        primary = margins[:, 1] / (margins[:, 0] + margins[:, 1] + ARWC_DELTA)
        return jnp.stack([primary, 1.0 - primary], axis=-1)
    raise ValueError(f"arwc must be one of {ARWC_MODES}, got {arwc!r}")


def virtual_reference(
    ref_logps: jax.Array,
    valid: jax.Array,
    *,
    alpha: Sequence[float] | None = None,
    epsilon: float | None = 0.1,
    epsilon_mode: str = "adaptive",
    arwc: str = "own_margin",
) -> jax.Array:
    """MRPO virtual reference `log π̃ [B, K] = −logsumexp_k(log α_k − ℓ̂_k)` from `ref_logps [B, K, R]`.

    Args:
        ref_logps: `[B, K, R]` float32 sequence log-probs of the `R` references (index 0 = primary).
        valid: `[B, K]` bool.
        alpha: `R` fixed weights (`≥ 0`, summing to 1), or `None` for per-example ARWC weights.
        epsilon: CTRO clipping rate, or `None` for no clipping.
        epsilon_mode: `"adaptive"` or `"fixed"` (see the module docstring).
        arwc: `"own_margin"` or `"authors_code"` (`R = 2`): how ARWC turns margins into weights (`alpha=None`).

    Returns:
        `[B, K]` float32, the virtual reference's log-probs `log π̃`.
    """
    ref_logps = jax.lax.stop_gradient(ref_logps)
    if alpha is None:
        weights = arwc_weights(ref_logps, valid, arwc)[:, None, :]
    else:
        weights = jnp.asarray(alpha, jnp.float32)[None, None, :]
    clipped = ref_logps if epsilon is None else ctro_clip(ref_logps, valid, epsilon, epsilon_mode)
    weights = jnp.broadcast_to(weights, clipped.shape)
    return -jax.nn.logsumexp(-clipped, axis=-1, b=weights)
