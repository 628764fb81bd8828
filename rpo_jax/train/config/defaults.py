"""The run configuration: one `ml_collections.ConfigDict`, every field documented here.

Recipes in `configs/NAME.py` start from `base_config()` and override fields; the command line overrides any
field: `rpo-train --config configs/smollm2.py --config.loss.name=rpo_bwd_kl --config.loss.hparams.eta=2`.
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.mode = "preference"             # "preference": offline preference training (this module's default job)
                                      # "online": sample K per prompt, score, update (rpo_jax.train.jobs.online; `online`)
                                      # "reward_model": Bradley–Terry reward model on pairs (`reward_model` below)

    # The policy: a Hugging Face checkpoint directory (or hub id), or a random init from `model.init`.
    c.model = ml_collections.ConfigDict()
    c.model.path = ""                 # HF directory / hub id; empty: random init from model.init (quickstart)
    c.model.architecture = ml_collections.config_dict.placeholder(str)  # None (default), or the path of a
                                      # Hugging Face config.json describing model.path's architecture, used when
                                      # model.path cannot be read (a hub id on a machine without the hub, e.g.
                                      # `rpo-plan`): configs/architectures/<name>.json
    c.model.init = ml_collections.ConfigDict({"model_type": "llama"})  # HF-style config fields for random init
    c.model.init_seed = 0
    c.model.tokenizer = ""            # tokenizer directory / hub id; empty: model.path
    c.model.dtype = "auto"            # compute dtype: "auto" = float32 on CPU, bfloat16 on GPU/TPU
    c.model.param_dtype = "float32"   # master weights (and optimizer state) dtype
    c.model.remat = "none"            # "none" | "full" | "dots_saveable" | ... (see rpo_jax.models)
    c.model.scan_unroll = 1           # layers per iteration of the layer scan (speed only; same results)
    c.model.attention = "auto"        # "auto" | "xla" | "cudnn" | "splash": attention implementation (speed only;
                                      # README "Attention implementations"); "auto": the backend's fused kernel
                                      # when it supports the model and batch, else XLA
    c.model.vocab_chunk_size = 0      # >0: chunked log-softmax over the vocabulary (large V)
    c.model.score_window = "auto"     # logit positions per sequence given to the output head: "auto" (the longest
                                      # response of the data, rounded up to 16), "off" (every position), or a number
    # LoRA (rpo_jax.models.lora; README "LoRA"): rank > 0 trains low-rank adapters y = x·W + (alpha/rank)·(x·A)·B
    # on the frozen base; the train state, optimizer and checkpoints hold the adapters only. The primary reference
    # (config.references empty, or entry 0 with an empty path) is then the base with the adapters switched off.
    c.model.lora = ml_collections.ConfigDict()
    c.model.lora.rank = 0             # 0: off (full fine-tuning); > 0: the adapters' rank r
    c.model.lora.alpha = 16.0         # scale s = alpha / rank
    c.model.lora.dropout = 0.0        # inverted dropout on each adapter's input during training steps, in [0, 1)
    c.model.lora.targets = "all-linear"  # "all-linear" (q,k,v,o,gate,up,down_proj) | comma-separated module names
                                      # ("q_proj,v_proj", PEFT's target_modules list) | a regex fully matched
                                      # against "model.layers.{i}.self_attn.q_proj"-style paths
    c.model.lora.init_from = ""       # a PEFT adapter directory (adapter_config.json + adapter_model.safetensors,
                                      # e.g. TRL SFT output) to start from (turns LoRA on): rank, alpha and targets
                                      # come from it; any of them set here to other than its default must agree
                                      # with the adapter's (else a one-line error). dropout stays this config's
    c.model.lora.reference = "base"   # the primary reference with LoRA: "base" (adapters off; TRL's choice for a
                                      # PEFT model without ref_model) | "initial" (base + the adapters the run
                                      # starts from, e.g. init_from's SFT adapter; a copy of the adapters only)
    c.model.lora.base_dtype = ""      # "" (param_dtype) | "int8" | "int4": the frozen base stored quantized
                                      # (QLoRA, rpo_jax.models.quantize)

    # References. Empty list: one reference, a frozen copy of the initial policy. Otherwise R entries, each
    # {"path": HF dir ("" = initial policy), "tokenizer": dir ("" = its path)}; index 0 is the primary.
    c.references = []
    c.reference_mode = "auto"         # "cache" (precompute [N,K,R] once) | "in_step" | "auto" (cache; in_step
                                      # when reference_sync.every > 0)
    c.reference_cache_dir = ""        # where cached reference log-probs live; empty: WORKDIR/ref_cache
    # References that move (TR-DPO, Gorbatovski et al. 2024; TRL's sync_ref_model / ref_model_sync_steps /
    # ref_model_mixup_alpha): after every `every`-th optimizer step (global step s = N, 2N, ...: the step that
    # brings the step count to s, as TRL's SyncRefModelCallback.on_step_end) the primary reference becomes
    # mix·θ + (1 − mix)·θ_ref with θ the parameters after that step (mix = 1: a hard copy); step s+1 scores
    # with it. every = 0: off. Preference training only; needs in-step references (reference_mode "cache" is an
    # error) and a primary reference of the policy's tokenizer and parameter shapes; the reference's current
    # weights are checkpointed (train state "reference"), so resume is exact. rpo_jax.train.step.steps.sync_reference
    c.reference_sync = ml_collections.ConfigDict({"every": 0, "mix": 1.0})

    c.data = ml_collections.ConfigDict()
    c.data.train = ""                 # file(s)/dir, comma-separated; "demo": the bundled demo task
    c.data.eval = ""                  # held-out file(s); empty: the demo test split when train is "demo", else
                                      # `eval_fraction` of train (split by `seed`), else no evaluation
    c.data.eval_fraction = 0.0
    c.data.format = ""                # "" = auto-detect per file
    c.data.pairs = ""                 # "" keep K responses | "best_worst" | "all": derive pairs from K
                                      # rewarded responses (a record whose rewards all tie gives none: counted, logged)
    c.data.max_length = 512
    c.data.max_prompt_length = 256
    c.data.truncation = "drop"        # "drop" | "truncate_prompt" | "truncate_response" | "keep_start" (TRL 1.16's:
                                      # each prompt + response keeps its first max_length tokens; a prompt that
                                      # fills max_length drops the record, counted)
    c.data.pairs_from = "labels"      # what orders a labelled pair (TRL / NeMo formats) for a preference-only loss:
                                      # "labels" (chosen over rejected, as TRL trains it; its scores only reach
                                      # reward-aware losses) | "rewards" (the scores decide; ties contribute 0).
                                      # K-response records have no labels: rewards rank them either way.
                                      # Ties and label/score disagreements are counted in the log and the run
                                      # identity (rpo_jax.data.selection.rewards_reach_loss)
    c.data.on_error = "raise"         # "raise" | "skip" (counted and reported)
    c.data.batch_size = 8             # global batch (prompts) per optimizer step
    c.data.micro_batches = 1          # gradient accumulation inside the step
    # Packing (rpo_jax.data.packing; README "Packing and shared prompts"): each batch's sequences packed into rows
    # of pack_length slots (0: a length chosen per batch; else ≥ data.max_length), attention within a sequence;
    # the same log-probs as padded batches. packing: "auto" (packs a batch when that saves ≥ 25 % of its slots;
    # off with micro_batches > 1), True (every batch; refuses micro_batches > 1) or False. share_prompt: one copy
    # of an example's prompt before its K responses in packed rows ("auto": unless a reference has its own
    # tokenizer). The score window applies to padded batches only.
    c.data.packing = ml_collections.FieldReference("auto", field_type=object)  # True / False / "auto"
    c.data.share_prompt = ml_collections.FieldReference("auto", field_type=object)
    c.data.pack_length = 0
    c.data.eval_batch_size = 16
    c.data.shuffle = True

    c.loss = ml_collections.ConfigDict()
    c.loss.name = "dpo"               # any name of rpo_jax.losses.available_losses()
    c.loss.hparams = ml_collections.ConfigDict({"beta": 0.1})
    c.loss.extra = []                 # weighted extra terms: [["sft", 0.05, {}], ...]
    c.loss.weight = 1.0               # the main term's weight (TRL's loss_weights[0])

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 1e-6
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 0
    c.optimizer.warmup_ratio = 0.0    # >0: warm up over ceil(warmup_ratio * total steps) instead (TRL's warmup_ratio)
    c.optimizer.end_lr_factor = 0.0
    c.optimizer.weight_decay = 0.0
    c.optimizer.weight_decay_mask = "matrices"
    c.optimizer.grad_clip_norm = 1.0
    c.optimizer.kwargs = ml_collections.ConfigDict()

    c.train = ml_collections.ConfigDict()
    c.train.steps = 100
    c.train.epochs = 0.0              # >0: train.steps = ceil(epochs * ceil(N / data.batch_size)) for the N train
                                      # examples left after tokenization (TRL's count of num_train_epochs)
    c.train.iterations = 1            # >1: iterated training, reference reset to the previous iterate
    c.train.log_every = 10
    c.train.eval_every = 50           # 0: only at the end
    c.train.checkpoint_every = 50
    c.train.keep_checkpoints = 3
    c.train.async_checkpointing = True
    c.train.export_at_end = True      # write WORKDIR/export (HF directory with tokenizer)
    c.train.progress_bar = True
    c.train.resume = "auto"           # a work directory with checkpoints of the same run (run_identity.json):
                                      # "auto" resumes it, or starts fresh when there is none; "must" refuses to
                                      # start fresh; "never" refuses a directory that has checkpoints; "force"
                                      # resumes even when the run's identity changed (the differences are logged).
                                      # A different run's checkpoints are never resumed silently nor deleted.
    c.train.on_nonfinite = "stop"     # a NaN/inf loss or gradient norm: "stop" (exit non-zero, keep the last good
                                      # checkpoint, never save the bad state) | "skip_step" (no update, counted)
    c.train.max_skipped_in_a_row = 10  # "skip_step": stop after this many non-finite steps (units) in a row

    # mode="online": each iteration samples `num_samples` responses to `prompts_per_iteration` prompts of
    # data.train with the current policy, scores them with the reward source, and takes `updates_per_iteration`
    # optimizer steps of `loss` on them (mini-batches of data.batch_size prompts, cycled). train.steps is unused.
    c.online = ml_collections.ConfigDict()
    c.online.iterations = 20
    c.online.prompts_per_iteration = 16
    c.online.num_samples = 4          # K responses per prompt
    c.online.updates_per_iteration = 4
    c.online.max_new_tokens = 32
    c.online.temperature = 1.0
    c.online.top_k = 0                # 0: no top-k filtering
    c.online.top_p = 1.0              # 1.0: no nucleus filtering
    c.online.stop_strings = []        # besides EOS: stop a response at any of these strings
    c.online.reference = "initial"    # "initial" | "previous_iterate" (reset every iteration) | "current" (sg policy)
    c.online.sampler = "policy"       # "policy": online; "initial": every sample from the initial policy (offline)
    c.online.reward_judge = ""        # "module:function" judge(prompt_text, response_text) -> float, e.g.
                                      # "rpo_jax.data.demo:judge"
    c.online.reward_model = ""        # or: a Hugging Face sequence-classification reward model directory
    c.online.eval_judge = ""          # ground-truth judge logged at eval ("" = reward_judge); may differ from
                                      # the training reward (a learned reward model)
    c.online.eval_prompts = 64        # held-out prompts (data.eval) sampled once each at eval
    c.online.eval_every = 5           # iterations between evaluations (0: only before the first and after the last)

    # mode="reward_model" (rpo_jax.train.jobs.reward_model): a Bradley–Terry reward model on pairs from config.data,
    # scored like reward_model_fn (chat template of prompt + response, pooled at the last non-pad token), exported
    # as a Hugging Face XForSequenceClassification checkpoint. model.path: a causal LM (its decoder + a fresh score
    # head), or a sequence-classification checkpoint (continued); empty: random init from model.init. The model.*,
    # data.*, optimizer.*, train.*, mesh and metrics fields apply as above; loss.*, references*, reference_mode and
    # data.max_prompt_length do not; data.truncation is "drop" or "truncate_prompt" (keep the last max_length tokens).
    c.reward_model = ml_collections.ConfigDict()
    c.reward_model.pairs = "all"          # with rewards: "all" pairs (i, j) with r_i > r_j | "best_worst"; ties give
                                          # none. K = 2 without rewards: response 0 chosen; K > 2 without: an error
    c.reward_model.center_coefficient = 0.0  # TRL's center_rewards_coefficient: + λ·(s_chosen + s_rejected)²
    c.reward_model.margin_scale = 0.0     # >0: margin m = margin_scale·(r_chosen − r_rejected) in −log σ(Δs − m)
    c.reward_model.label = 0              # the score column trained (a fresh head has one label)

    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})

    # CPU only: keep XLA:CPU's per-step temporary buffer mapped between steps (rpo_jax.train.runtime.cpu_memory): 13-23 % faster
    # steps here, for a process that keeps its peak heap and dispatches synchronously. rpo-train applies it at
    # start-up.
    c.cpu_reuse_memory = True

    c.metrics = ml_collections.ConfigDict()
    c.metrics.peak_flops = 0.0        # one chip's peak FLOP/s (MFU = FLOP/s ÷ (peak × chips)); 0: measure a matmul
    c.metrics.tensorboard = True
    return c
