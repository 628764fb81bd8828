"""`rpo-eval --policy DIR --baseline DIR|chosen --prompts FILE --judge SPEC --out DIR`: the generation-based
evaluation of an exported model (`rpo_jax.train.jobs.generation_eval`, the same as `config.eval.generation`).

Writes OUT/summary.json (the metrics, named as in training without the `eval/generation/` prefix, and the
settings), OUT/samples.jsonl (every prompt, both responses, their lengths and the judgment) and OUT/evaluation.png
(win rate with its interval, LC win rate, both sides' length distributions; skipped without matplotlib). It
ends with one line: `rpo-eval: win rate W [LOW, HIGH] (LC L) over N prompts; wrote OUT`.
"""

from __future__ import annotations

import argparse
import json

from rpo_jax.train.cli.common import one_line_errors, quiet_libraries


def parser() -> argparse.ArgumentParser:
    """The command line of `rpo-eval`."""
    p = argparse.ArgumentParser(
        prog="rpo-eval",
        description="Judge an exported model's sampled responses against a baseline's: win rate with its "
        "bootstrap interval, length-controlled win rate, length ratio, reward, KL.",
    )
    p.add_argument("--policy", required=True, help="the evaluated model: an exported Hugging Face directory")
    p.add_argument(
        "--baseline",
        required=True,
        help="another model directory (its samples; with the policy's tokenizer also the KL), or 'chosen' (the "
        "data's chosen responses: a pair's first, else the highest reward)",
    )
    p.add_argument("--prompts", required=True, help="a prompts file or any preference data file ('demo': the demo)")
    p.add_argument(
        "--judge",
        required=True,
        help="'module:function' (judge(prompt_text, response) -> float), a reward-model directory, or 'llm:DIR'",
    )
    p.add_argument("--out", required=True, help="the output directory")
    p.add_argument(
        "--judge-template", default="", help="'llm:' judges: a template file ({prompt}, {response_a}, {response_b})"
    )
    p.add_argument("--num-prompts", type=int, default=64, help="prompts evaluated: a subset drawn with --seed")
    p.add_argument("--samples-per-prompt", type=int, default=1, help="samples per prompt of each model")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest sampled response in tokens")
    p.add_argument("--max-prompt-length", type=int, default=512, help="longer prompts keep their last tokens")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-k", type=int, default=0, help="top-k filtering (0: none)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus filtering (1.0: none)")
    p.add_argument("--stop-string", action="append", default=[], help="stop a response at this string (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt subset and the sampling")
    p.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the bootstrap interval")
    p.add_argument("--verbose", action="store_true", help="on an error, print the traceback too")
    return p


def config_of(args: argparse.Namespace):
    """The run configuration an evaluation loads models and samples with (validated: one-line errors)."""
    from rpo_jax.train.config.defaults import base_config
    from rpo_jax.train.config.validation import validate

    cfg = base_config()
    cfg.seed = args.seed
    cfg.model.path = args.policy
    cfg.data.max_prompt_length = args.max_prompt_length
    cfg.data.max_length = max(int(cfg.data.max_length), args.max_prompt_length + args.max_new_tokens)
    cfg.data.truncation = "truncate_prompt"
    g = cfg.eval.generation
    g.prompts, g.num_prompts, g.samples_per_prompt = args.prompts, args.num_prompts, args.samples_per_prompt
    g.max_new_tokens, g.temperature, g.top_k, g.top_p = args.max_new_tokens, args.temperature, args.top_k, args.top_p
    g.stop_strings, g.baseline, g.judge = list(args.stop_string), args.baseline, args.judge
    g.judge_template, g.bootstrap_seed = args.judge_template, args.bootstrap_seed
    return validate(cfg)


def evaluate_models(args: argparse.Namespace) -> dict:
    """Run the evaluation `args` describe and write OUT; returns the summary."""
    from rpo_jax.data import storage
    from rpo_jax.models.win_rates import kl_estimate
    from rpo_jax.train.build.state import compute_dtype
    from rpo_jax.train.jobs.generation_eval import (
        generate,
        ids_for,
        judge_samples,
        model_generator,
        read_eval_records,
        sample_logps,
        sampling_key,
        select_prompts,
        write_jsonl,
    )
    from rpo_jax.train.jobs.judging import make_judge, plot_evaluation
    from rpo_jax.train.runtime.global_batches import config_mesh

    cfg = config_of(args)
    gen = cfg.eval.generation
    mesh, dtype = config_mesh(cfg.mesh), compute_dtype(cfg.model.dtype)
    chosen = gen.baseline == "chosen"
    if not chosen and not storage.as_path(gen.baseline).is_dir():
        raise ValueError(f"--baseline {gen.baseline}: not a model directory nor 'chosen'")
    records = read_eval_records(gen.prompts, want_chosen=chosen)
    judge = make_judge(gen.judge, cfg, mesh=mesh, dtype=dtype, template=gen.judge_template)
    policy, params = model_generator(args.policy, cfg, gen, mesh, dtype)
    prompts = select_prompts(
        records, policy.setup.tokenizer, cfg, gen, seed=cfg.seed, want_chosen=chosen, where=gen.prompts
    )
    samples = int(gen.samples_per_prompt)
    s = generate(policy, params, prompts.ids, samples, sampling_key(cfg.seed, 0, 0))
    kl = None
    if chosen:
        baseline = [[c] for c in prompts.chosen]
    else:
        other, other_params = model_generator(gen.baseline, cfg, gen, mesh, dtype)
        baseline = generate(
            other, other_params, ids_for(other, prompts, cfg), samples, sampling_key(cfg.seed, 1, 0)
        ).texts
        if other.setup.tokenizer.get_vocab() == policy.setup.tokenizer.get_vocab():  # the same token ids
            valid = s.mask.any(-1)
            kl = kl_estimate(s.logps[valid], sample_logps(other, other_params, prompts.ids, s)[valid])
    policy_ids = [[row[m].tolist() for row, m in zip(s.tokens[p], s.mask[p])] for p in range(len(s.texts))]
    metrics, rows, arrays = judge_samples(
        prompts,
        s.texts,
        baseline,
        judge,
        policy.setup.tokenizer,
        bootstrap_seed=int(gen.bootstrap_seed),
        kl=kl,
        policy_ids=policy_ids,
    )
    summary = {**metrics, "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(gen).items()}}
    summary["settings"].update(policy=args.policy, seed=cfg.seed)
    if jax_process_index() == 0:  # the main process writes
        out = storage.as_path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        storage.write_atomically(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        write_jsonl(out / "samples.jsonl", rows)
        plot_evaluation(out / "evaluation.png", metrics, arrays["policy_lengths"], arrays["baseline_lengths"])
    return summary


def jax_process_index() -> int:
    """This process's index (only the main process prints)."""
    import jax

    return jax.process_index()


def main(argv: list[str] | None = None) -> None:
    """`rpo-eval`: see the module docstring."""
    args = parser().parse_args(argv)
    quiet_libraries()
    with one_line_errors("rpo-eval", None, args.verbose):
        from rpo_jax.train.runtime.processes import initialize_from_environment

        initialize_from_environment()  # no TPU probe on a machine without one; several processes when described
        summary = evaluate_models(args)
        if jax_process_index() != 0:
            return
        print(
            f"rpo-eval: win rate {summary['win_rate']:.3f} [{summary['win_rate_ci_low']:.3f}, "
            f"{summary['win_rate_ci_high']:.3f}] (LC {summary['lc_win_rate']:.3f}) over "
            f"{int(summary['num_prompts'])} prompts; wrote {args.out}",
            flush=True,
        )


if __name__ == "__main__":
    main()
