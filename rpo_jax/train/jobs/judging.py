"""The judge of a generation-based evaluation from its spec (`config.eval.generation.judge`, `rpo-eval --judge`),
and its plots (matplotlib, optional: without it the PNGs are skipped with one warning).

Judge specs: `"module:function"` — a Python judge `judge(prompt_text, response) -> float` (e.g.
`rpo_jax.data.demo:judge`); a directory — a Hugging Face sequence-classification reward model; `"llm:DIR"` — a
causal LM asked in both orders (`rpo_jax.models.judges.llm_judge`), with a template file or the built-in one.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence

import numpy as np

from rpo_jax.data import storage
from rpo_jax.models import judge_fn, load_reward_model, reward_model_fn
from rpo_jax.models.judges import (
    DEFAULT_TEMPLATE,
    PairJudge,
    check_template,
    decoder_next_token_logps,
    llm_judge,
    reward_judge,
)
from rpo_jax.train.build.data import load_tokenizer
from rpo_jax.train.build.model import load_model

log = logging.getLogger(__name__)
_FUNCTION_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def read_template(path: str) -> str:
    """The LLM judge's template: the file at `path` (checked: one-line errors naming it), or the built-in one
    for `""`."""
    if not path:
        return DEFAULT_TEMPLATE
    try:
        text = storage.as_path(path).read_text()
    except OSError as e:
        raise ValueError(f"{path}: cannot read the judge template ({e.strerror or e})") from None
    return check_template(text, path)


def make_judge(spec: str, cfg, *, mesh, dtype, template: str = "", batch_size: int = 16) -> PairJudge:
    """The `PairJudge` of a judge spec (module docstring); a one-line ValueError for a spec that is none of them.

    Args:
        spec: `"module:function"`, a reward-model directory or `"llm:DIR"`.
        cfg: the run configuration (model loading settings; `data.max_length` bounds a reward model's input).
        mesh: where a judge model's weights go.
        dtype: its compute dtype.
        template: the LLM judge's template file (`""`: built in).
        batch_size: rows per judge forward pass.

    Returns:
        The judge.
    """
    from rpo_jax.train.build.data import import_object

    if not spec:
        raise ValueError("no judge: give a 'module:function', a reward-model directory or 'llm:DIR'")
    if spec.startswith("llm:"):
        path = spec[4:]
        if not path or not storage.as_path(path).exists():
            raise ValueError(f"judge {spec!r}: {path or '(empty)'} is not a model directory")
        text = read_template(template)
        tokenizer = load_tokenizer(path)
        model, _ = load_model(path, cfg, mesh, dtype)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return llm_judge(decoder_next_token_logps(model, pad_id=int(pad), batch_size=batch_size), tokenizer, text)
    if template:
        raise ValueError(f"a judge template ({template}) is for 'llm:DIR' judges, not judge {spec!r}")
    if storage.as_path(spec).is_dir():
        model, _ = load_reward_model(spec, dtype=dtype, mesh=mesh)
        return reward_judge(
            reward_model_fn(
                model,
                load_tokenizer(spec),
                max_length=int(cfg.data.max_length) * 2,
                batch_size=batch_size,
                truncation="left",
            )
        )
    if _FUNCTION_SPEC.match(spec):
        return reward_judge(judge_fn(import_object(spec)))
    raise ValueError(f"judge {spec!r}: not a 'module:function', an existing reward-model directory or 'llm:DIR'")


# --------------------------------------------------------------------------------------------- plots
_warned = False


def _pyplot():
    """matplotlib's pyplot (Agg), or None with one warning per process when matplotlib is not installed."""
    global _warned
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not _warned:
            log.warning("matplotlib is not installed: the evaluation's PNG plots are skipped (pip install matplotlib)")
            _warned = True
        return None
    return plt


def _save(fig, plt, path: storage.PathLike) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    storage.write_atomically(path, buf.getvalue())


def plot_evaluation(
    path: storage.PathLike,
    metrics: Mapping[str, float],
    policy_lengths: Sequence[float],
    baseline_lengths: Sequence[float],
) -> bool:
    """One evaluation's PNG: the win rate with its interval and the LC win rate (left), the response lengths of
    both sides (right). Returns False when matplotlib is missing (nothing written)."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    wr, lo, hi = metrics["win_rate"], metrics["win_rate_ci_low"], metrics["win_rate_ci_high"]
    left.errorbar([0], [wr], yerr=[[wr - lo], [hi - wr]], fmt="o", capsize=6, label="win rate (95 % CI)")
    left.plot([1], [metrics["lc_win_rate"]], "s", label="length-controlled")
    left.axhline(0.5, color="grey", lw=0.8, ls="--")
    left.set(xlim=(-0.7, 1.7), ylim=(0, 1), xticks=[0, 1], xticklabels=["win rate", "LC"], title="policy vs baseline")
    left.legend(fontsize=8, loc="lower right")
    bins = np.histogram_bin_edges(np.concatenate([policy_lengths, baseline_lengths]), bins=20)
    right.hist(baseline_lengths, bins=bins, alpha=0.6, label="baseline")
    right.hist(policy_lengths, bins=bins, alpha=0.6, label="policy")
    right.set(xlabel="response length (tokens)", ylabel="responses", title="lengths")
    right.legend(fontsize=8)
    _save(fig, plt, path)
    return True


def plot_over_training(path: storage.PathLike, points: Sequence[tuple[int, float, float, float]]) -> bool:
    """The win rate and its interval per evaluated step (`points`: (step, win rate, low, high)). Returns False
    when matplotlib is missing or there is no point."""
    plt = None if not points else _pyplot()
    if plt is None:
        return False
    steps, wr, lo, hi = (np.asarray(x, float) for x in zip(*points))
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.fill_between(steps, lo, hi, alpha=0.25, label="95 % interval")
    ax.plot(steps, wr, "o-", label="win rate")
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="step", ylabel="win rate vs baseline", ylim=(0, 1), title="judged win rate over training")
    ax.legend(fontsize=8)
    _save(fig, plt, path)
    return True
