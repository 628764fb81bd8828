"""`config.eval`: generation-based evaluation during training (`config.eval.generation`; the job is
`rpo_jax.train.jobs.generation_eval`, the same evaluation as `rpo-eval`)."""

from __future__ import annotations

from pydantic import ConfigDict, Field, model_validator

from rpo_jax.train.config.sections import Section
from rpo_jax.train.config.values import ConfigError

#: The baselines `config.eval.generation.baseline` names (anything else: an exported model directory).
BASELINE_KINDS = ("reference", "initial", "chosen")


class GenerationEvalSection(Section):
    """Sample the policy's responses to held-out prompts, judge them against a baseline's, and log win rates with
    intervals (eval/generation/…) and every prompt's pair to WORKDIR/generations/step_N.jsonl."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    every: int = Field(
        0,
        ge=0,
        description="optimizer steps between evaluations (online mode: iterations); 0: off (when on, the run's end is "
        "always included)",
    )
    prompts: str = Field(
        "",
        description='"": the prompts of the held-out split (data.eval / data.eval_fraction); or a prompts file, or '
        "any preference data file (its prompts)",
    )
    num_prompts: int = Field(64, ge=1, description="prompts evaluated: a fixed subset drawn with config.seed")
    samples_per_prompt: int = Field(1, ge=1, description="policy (and baseline) samples per prompt")
    max_new_tokens: int = Field(32, ge=1, description="longest sampled response in tokens")
    temperature: float = Field(1.0, ge=0, description="sampling temperature; 0: greedy")
    top_k: int = Field(0, ge=0, description="top-k filtering; 0: none")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus filtering; 1.0: none")
    stop_strings: tuple[str, ...] = Field((), strict=False, description="besides EOS: stop a response at these")
    baseline: str = Field(
        "initial",
        description='"initial" (the policy before training) | "reference" (config.references[0]; the initial '
        "policy when its path is empty) | \"chosen\" (the data's chosen response: a pair's first, else the "
        "highest reward) | an exported model directory; its samples are generated once, cached in "
        "WORKDIR/generations/baseline.jsonl",
    )
    judge: str = Field(
        "",
        description='"module:function" judge(prompt_text, response) -> float (e.g. "rpo_jax.data.demo:judge") | a '
        'reward-model directory | "llm:DIR" (a causal LM judging pairs in both orders); required when every > 0',
    )
    judge_template: str = Field(
        "", description='"llm:" judges: a prompt template file with {prompt}, {response_a}, {response_b}; "": built in'
    )
    bootstrap_seed: int = Field(
        0, ge=0, description="seed of the paired bootstrap's resampling (0 is a seed like any other)"
    )
    plot: bool = Field(True, description="WORKDIR/generations/win_rate.png at the end (needs matplotlib)")

    @model_validator(mode="after")
    def _judge(self):
        if self.every and not self.judge:
            raise ConfigError(
                f"config.eval.generation.every={self.every} needs a judge: set config.eval.generation.judge "
                '("module:function", a reward-model directory or "llm:DIR")'
            )
        return self


class EvalSection(Section):
    """Evaluation beyond the held-out loss (which train.eval_every paces)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    generation: GenerationEvalSection = Field(
        default_factory=GenerationEvalSection, description="judged win rates of sampled responses"
    )
