"""The three RPO distances ``D(a ‖ b)`` between an implicit reward gap ``a`` and a target gap ``b``.

From Sun et al., *Reward-aware Preference Optimization* (arXiv:2502.00203), NVIDIA's names (note that
"backward" is ``KL(target ‖ model)``). All are ``≥ 0``, ``= 0`` iff ``a = b``, computed in log space (finite for
``|a|, |b|`` of 1e4), and elementwise on arrays of any shape:

===========  =====================================================================  ======================
name         ``D(a ‖ b)``                                                           ``∂D/∂a``
===========  =====================================================================  ======================
``sq``       ``(a − b)²``                                                           ``2(a − b)``
``bwd_kl``   ``KL(Bern σ(b) ‖ Bern σ(a))``                                          ``σ(a) − σ(b)``
``fwd_kl``   ``KL(Bern σ(a) ‖ Bern σ(b))``                                          ``σ(a)σ(−a)(a − b)``
===========  =====================================================================  ======================

``bwd_kl`` accepts an infinite target: ``b = +∞`` (``σ(b) = 1``) gives ``−log σ(a)``, DPO's loss.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

__all__ = ["squared", "bwd_kl", "fwd_kl", "bernoulli_kl", "DISTANCES", "get_distance"]

Distance = Callable[[jax.Array, jax.Array], jax.Array]


def _p_log_ratio(p: jax.Array, log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """``p · (log p − log q)`` with the convention ``0 · log 0 = 0`` (safe in value and gradient)."""
    positive = p > 0
    safe_log_p = jnp.where(positive, log_p, 0.0)
    return jnp.where(positive, p * (safe_log_p - log_q), 0.0)


def bernoulli_kl(p_logit: jax.Array, q_logit: jax.Array) -> jax.Array:
    """`KL(Bern σ(p_logit) ‖ Bern σ(q_logit))`, elementwise, in log space.

    `= σ(p)·(log σ(p) − log σ(q)) + σ(−p)·(log σ(−p) − log σ(−q))`; `p_logit = ±∞` is allowed.

    Args:
        p_logit: the logit of the first Bernoulli (any shape).
        q_logit: the logit of the second, the same shape (or broadcastable).

    Returns:
        The KL elementwise, float32.
    """
    log_p1, log_p0 = jax.nn.log_sigmoid(p_logit), jax.nn.log_sigmoid(-p_logit)
    log_q1, log_q0 = jax.nn.log_sigmoid(q_logit), jax.nn.log_sigmoid(-q_logit)
    return _p_log_ratio(jnp.exp(log_p1), log_p1, log_q1) + _p_log_ratio(jnp.exp(log_p0), log_p0, log_q0)


def squared(a: jax.Array, b: jax.Array) -> jax.Array:
    """`D_sq(a ‖ b) = (a − b)²` (NVIDIA's code; a ½ would only rescale). `∂D/∂a = 2(a − b)`.

    Args:
        a: the implicit reward gap (any shape).
        b: the target gap, the same shape (or broadcastable).

    Returns:
        `D(a ‖ b)` elementwise, float32.
    """
    return jnp.square(a - b)


def bwd_kl(a: jax.Array, b: jax.Array) -> jax.Array:
    """`D_bwd(a ‖ b) = KL(Bern σ(b) ‖ Bern σ(a))`. `∂D/∂a = σ(a) − σ(b)`; `b = +∞` gives `−log σ(a)`.

    Args:
        a: the implicit reward gap (any shape).
        b: the target gap, the same shape (or broadcastable).

    Returns:
        `D(a ‖ b)` elementwise, float32.
    """
    return bernoulli_kl(b, a)


def fwd_kl(a: jax.Array, b: jax.Array) -> jax.Array:
    """`D_fwd(a ‖ b) = KL(Bern σ(a) ‖ Bern σ(b))`. `∂D/∂a = σ(a)σ(−a)(a − b)`; `b` must be finite.

    Args:
        a: the implicit reward gap (any shape).
        b: the target gap, the same shape (or broadcastable).

    Returns:
        `D(a ‖ b)` elementwise, float32.
    """
    return bernoulli_kl(a, b)


#: The RPO distances by name, `D(a ‖ b)` elementwise: `"sq"` (`squared`), `"bwd_kl"` (`bwd_kl`), `"fwd_kl"` (`fwd_kl`).
DISTANCES: dict[str, Distance] = {"sq": squared, "bwd_kl": bwd_kl, "fwd_kl": fwd_kl}


def get_distance(name: str) -> Distance:
    """The distance called ``name`` (``"sq"``, ``"bwd_kl"`` or ``"fwd_kl"``); ``ValueError`` otherwise."""
    try:
        return DISTANCES[name]
    except KeyError:
        raise ValueError(f"unknown RPO distance {name!r}; valid distances: {sorted(DISTANCES)}") from None
