"""Pairwise judges for generation-based evaluation: one interface, three kinds.

`judge(prompts, responses_a, responses_b) -> Judgment`: for N prompts (chat messages or strings, as a `RewardFn`
takes them) and one response of each side, `Judgment.prefs [N]` is the preference for side A in [0, 1] (1: A
wins, 0: B wins, 0.5: a tie). The evaluation passes the policy as A and the baseline as B.

* `reward_judge(reward_fn)`: any `RewardFn` — a Python judge (`judge_fn`, e.g. `rpo_jax.data.demo:judge`) or a
  reward model (`reward_model_fn`): A wins when its reward is higher, a tie when equal. The rewards are reported.
* `llm_judge(next_token_logps, tokenizer, template)`: a causal LM asked which response is better (a prompt
  template with `{prompt}`, `{response_a}`, `{response_b}`), read from the log-probabilities of the two answer
  tokens (no sampling): q = p("A") / (p("A") + p("B")). Each pair is asked in both orders — q₁ with the policy
  first, q₂ with the baseline first — and the preference is (q₁ + 1 − q₂) / 2, which cancels a constant
  position bias. The bias itself is reported as `first_position [N]` = (q₁ + q₂) / 2, whose mean `2·m − 1` is
  the position bias: 0 for a judge that ignores order, 1 for one that always picks the first response.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rpo_jax.models.reward_functions import Message, RewardFn, last_user_text

#: The LLM judge's default prompt (user message; the tokenizer's chat template wraps it when it has one).
DEFAULT_TEMPLATE = (
    "Which response answers the instruction better? Judge helpfulness and correctness, not length.\n\n"
    "Instruction:\n{prompt}\n\nResponse A:\n{response_a}\n\nResponse B:\n{response_b}\n\n"
    "Answer with one letter, A or B."
)
TEMPLATE_FIELDS = ("{prompt}", "{response_a}", "{response_b}")


@dataclasses.dataclass
class Judgment:
    """A judge's verdict on N pairs.

    Attributes:
        prefs: `[N]` float64 preference for response A in [0, 1] (a tie: 0.5).
        rewards_a: `[N]` the rewards of A (reward judges), else None.
        rewards_b: `[N]` the rewards of B, else None.
        first_position: `[N]` the LLM judge's preference for whichever response came first, averaged over both
            orders (0.5: no position bias), else None.
    """

    prefs: np.ndarray
    rewards_a: np.ndarray | None = None
    rewards_b: np.ndarray | None = None
    first_position: np.ndarray | None = None


#: `judge(prompts [N], responses_a [N], responses_b [N]) -> Judgment`.
PairJudge = Callable[[Sequence[Sequence[Message] | str], Sequence[str], Sequence[str]], Judgment]


def _check_pairs(prompts, a, b) -> None:
    if not len(prompts) == len(a) == len(b):
        raise ValueError(f"{len(prompts)} prompts, {len(a)} responses A and {len(b)} responses B: expected one each")


def preference_from_rewards(rewards_a: np.ndarray, rewards_b: np.ndarray) -> np.ndarray:
    """`[N]` preferences for A from rewards: 1 where `r_a > r_b`, 0.5 where equal, 0 where lower.

    Args:
        rewards_a: `[N]` rewards of A.
        rewards_b: `[N]` rewards of B.

    Returns:
        `[N]` float64 `(sign(r_a − r_b) + 1) / 2`.
    """
    return (np.sign(np.asarray(rewards_a, np.float64) - np.asarray(rewards_b, np.float64)) + 1) / 2


def reward_judge(reward_fn: RewardFn) -> PairJudge:
    """A pairwise judge from a `RewardFn` (a judge function or a reward model): both responses scored together
    (`reward_fn(prompts, [[a, b], ...])`), the higher reward wins.

    Args:
        reward_fn: the `RewardFn`.

    Returns:
        The `PairJudge` (its `Judgment` carries both sides' rewards).
    """

    def judge(prompts, responses_a, responses_b) -> Judgment:
        _check_pairs(prompts, responses_a, responses_b)
        rewards = np.asarray(reward_fn(list(prompts), [[a, b] for a, b in zip(responses_a, responses_b)]))
        if rewards.shape != (len(prompts), 2) or not np.all(np.isfinite(rewards)):
            raise ValueError(f"the reward function returned {rewards.shape}; expected finite [{len(prompts)}, 2]")
        return Judgment(preference_from_rewards(rewards[:, 0], rewards[:, 1]), rewards[:, 0], rewards[:, 1])

    return judge


def check_template(template: str, where: str = "template") -> str:
    """`template` itself, or a one-line ValueError naming `where` and the placeholders it lacks.

    Args:
        template: the LLM judge's prompt with `{prompt}`, `{response_a}` and `{response_b}`.
        where: what to name in the error (a file).

    Returns:
        The template.
    """
    missing = [f for f in TEMPLATE_FIELDS if f not in template]
    if missing:
        raise ValueError(f"{where}: the judge template lacks the placeholder(s) {', '.join(missing)}")
    return template


def answer_token_ids(tokenizer, answers: tuple[str, str] = ("A", "B")) -> tuple[int, int]:
    """The token ids of the two answers (each must encode to one token, without special tokens; distinct).

    Args:
        tokenizer: the judge model's tokenizer.
        answers: the answer strings for the first and the second response.

    Returns:
        `(id of answers[0], id of answers[1])`.
    """
    ids = []
    for a in answers:
        x = tokenizer(a, add_special_tokens=False)["input_ids"]
        if len(x) != 1:
            raise ValueError(f"the judge's answer {a!r} is {len(x)} tokens in its tokenizer; expected one")
        ids.append(int(x[0]))
    if ids[0] == ids[1]:
        raise ValueError(f"the judge's answers {answers} are the same token")
    return ids[0], ids[1]


def judge_prompt_ids(tokenizer, template: str, prompt: str, first: str, second: str) -> list[int]:
    """Token ids asking the judge: `template` filled in, as a user message of the tokenizer's chat template with
    the generation prompt (plain text with the tokenizer's special tokens when it has no template).

    Args:
        tokenizer: the judge's tokenizer.
        template: a checked template (`check_template`).
        prompt: the instruction's text.
        first: the response shown as A.
        second: the response shown as B.

    Returns:
        The token ids; the judge's next token answers.
    """
    text = template.replace("{prompt}", prompt).replace("{response_a}", first).replace("{response_b}", second)
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(text)["input_ids"])


def decoder_next_token_logps(model, *, pad_id: int, batch_size: int) -> Callable[[Sequence[Sequence[int]]], np.ndarray]:
    """`next_token_logps(token lists [N]) -> [N, V]` log-softmax of a `Decoder`'s logits after each list's last
    token: right-padded batches of `batch_size` rows, lengths padded to a multiple of 64 (fewer compilations).

    Args:
        model: a `rpo_jax.models.Decoder`.
        pad_id: the padding token id.
        batch_size: rows per forward pass.

    Returns:
        The function (float32 numpy output).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be ≥ 1")

    graphdef, state = nnx.split(model)  # the weights an argument of the program, not constants in it

    @jax.jit
    def last_logps(state, tokens, mask, last):
        logits = nnx.merge(graphdef, state)(tokens, mask)
        return jax.nn.log_softmax(logits[jnp.arange(tokens.shape[0]), last].astype(jnp.float32), axis=-1)

    def run(token_lists):
        out = []
        for start in range(0, len(token_lists), batch_size):
            chunk = token_lists[start : start + batch_size]
            width = -(-max(len(x) for x in chunk) // 64) * 64
            tokens = np.full((batch_size, width), pad_id, np.int32)
            mask = np.zeros((batch_size, width), bool)
            last = np.zeros((batch_size,), np.int32)
            for i, x in enumerate(chunk):
                tokens[i, : len(x)], mask[i, : len(x)], last[i] = x, True, len(x) - 1
            mask[len(chunk) :, 0] = True  # filler rows: one token, discarded
            out.append(np.asarray(last_logps(state, tokens, mask, last))[: len(chunk)])
        return np.concatenate(out, axis=0)

    return run


def llm_judge(
    next_token_logps: Callable[[Sequence[Sequence[int]]], np.ndarray],
    tokenizer,
    template: str = DEFAULT_TEMPLATE,
    *,
    answers: tuple[str, str] = ("A", "B"),
) -> PairJudge:
    """A pairwise LLM judge from the log-probabilities of its two answer tokens, in both orders (module
    docstring: prefs = (q₁ + 1 − q₂) / 2, first_position = (q₁ + q₂) / 2).

    Args:
        next_token_logps: `[N]` token lists → `[N, V]` next-token log-probs (`decoder_next_token_logps`).
        tokenizer: the judge's tokenizer.
        template: the prompt with `{prompt}`, `{response_a}`, `{response_b}` (`check_template`).
        answers: the answer strings naming the first and the second response.

    Returns:
        The `PairJudge`.
    """
    check_template(template)
    first_id, second_id = answer_token_ids(tokenizer, answers)

    def judge(prompts, responses_a, responses_b) -> Judgment:
        _check_pairs(prompts, responses_a, responses_b)
        texts = [last_user_text(p, b) for b, p in enumerate(prompts)]
        asks = [judge_prompt_ids(tokenizer, template, t, a, b) for t, a, b in zip(texts, responses_a, responses_b)]
        asks += [judge_prompt_ids(tokenizer, template, t, b, a) for t, a, b in zip(texts, responses_a, responses_b)]
        logps = np.asarray(next_token_logps(asks), np.float64)
        q = np.exp(logps[:, first_id] - np.logaddexp(logps[:, first_id], logps[:, second_id]))  # p(first)
        n = len(prompts)
        q1, q2 = q[:n], q[n:]
        return Judgment(prefs=(q1 + 1 - q2) / 2, first_position=(q1 + q2) / 2)

    return judge


def position_bias(first_position: np.ndarray) -> float:
    """The LLM judge's position bias: `2 · mean(first_position) − 1` in [−1, 1] (0: none; 1: always the first).

    Args:
        first_position: `Judgment.first_position [N]`.

    Returns:
        The bias.
    """
    return float(2 * np.mean(first_position) - 1)
