"""Typed schemas of the RL and generation groups: ``grpo`` (with ``grpo.loss``), ``reward``, ``rejection`` and
``eval``. Part of ``r1mega.config.schema`` (which re-exports every name here and composes them into
``R1Config``); the same rules hold: defaults live only here, the docstring under each field documents it,
per-group checks run in ``__post_init__``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from r1mega.config.checks import check_choice as _check_choice
from r1mega.config.checks import check_positive as _check_positive
from r1mega.config.errors import ConfigError

# The GRPO maths registered in r1mega.rl (tests/rl/test_config.py checks these match the registries; the
# names live here so that composing a config never imports torch).
ADV_ESTIMATOR_NAMES = ("dr_grpo", "grpo", "grpo_batch_norm", "rloo")
POLICY_LOSS_NAMES = ("gspo", "ppo")
LOSS_AGG_NAMES = ("seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "token-mean")
KL_ESTIMATOR_NAMES = ("k1", "k2", "k3", "low_var_kl")
ROLLOUT_CORRECTION_NAMES = ("tis", "tis_seq")
_LOSS = "grpo.loss"


def _check_loss_at_least(name: str, value: float, low: float, strict: bool = False) -> None:
    if value < low or (strict and value == low):
        raise ConfigError(f"{_LOSS}.{name}", value, f"a number {'>' if strict else '>='} {low}")


@dataclass
class GRPOLossConfig:
    """How rewards become advantages and how the policy loss is formed, clipped, aggregated and regularised."""

    adv_estimator: str = "grpo"
    """Advantage estimator: grpo ((r-mean)/(std+eps), unbiased group std), dr_grpo (r-mean), grpo_batch_norm
    (group-centred, divided by the batch std) or rloo (leave-one-out baseline). Dr. GRPO's "no std" is
    chosen here, so there is no separate norm_adv_by_std switch."""
    adv_eps: float = 1e-6
    """Added to the std in grpo and grpo_batch_norm: A = (r - mean) / (std + adv_eps)."""
    clip_eps_low: float = 0.2
    """Lower PPO clip: the ratio is clipped below at 1 - clip_eps_low (for negative advantages)."""
    clip_eps_high: float = 0.2
    """Upper PPO clip: the ratio is clipped above at 1 + clip_eps_high (for positive advantages).
    DAPO's clip-higher uses 0.28 with clip_eps_low 0.2; GSPO uses 4e-4 with 3e-4."""
    clip_ratio_c: float | None = None
    """Dual-clip bound (> 1, typically 3): for negative advantages the per-token loss is capped at
    -A * clip_ratio_c, so a huge ratio cannot blow up the loss. None turns dual-clip off."""
    policy_loss: str = "ppo"
    """Policy loss: ppo (token-level ratio, clipped surrogate) or gspo (sequence-level ratio)."""
    loss_agg_mode: str = "token-mean"
    """How per-token losses become a scalar: token-mean, seq-mean-token-mean (GRPO paper),
    seq-mean-token-sum, or seq-mean-token-sum-norm (Dr. GRPO; needs max_response_length)."""
    kl_coef: float = 0.001
    """Weight of the KL(pi || pi_ref) regulariser; 0 turns it off (and the reference model is not needed)."""
    kl_estimator: str = "low_var_kl"
    """KL estimator: k1, k2, k3 or low_var_kl (k3 clamped to [-10, 10], verl's default for the KL loss)."""
    kl_in_reward: bool = False
    """Subtract kl_coef * sum_t KL_t(pi_old || pi_ref) from the reward before the advantages instead of
    adding kl_coef * KL to the loss (never both)."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus: the loss gets - entropy_coef * aggregated entropy. 0 turns it off."""
    max_response_length: int | None = None
    """Constant normaliser of seq-mean-token-sum-norm (set it to the generation limit); None for other modes."""
    rollout_correction: str | None = None
    """Correct the rollout/trainer mismatch (the engine's log-probabilities differ from the trainer's for the
    same weights, mostly in bf16): None uses the engine's log-probabilities as the old policy (the default);
    tis recomputes the old policy's log-probabilities with the trainer before the updates (the PPO ratio's
    denominator) and weights each token's policy loss by min(pi_old / pi_rollout, rollout_is_cap) (truncated
    importance sampling, Yao et al. 2025); tis_seq uses one weight per sequence, the product of its tokens'
    ratios truncated at rollout_is_cap. Costs one extra forward over the rollout batch per step."""
    rollout_is_cap: float = 2.0
    """The truncation C of rollout_correction's importance weights (verl's default 2)."""

    def __post_init__(self) -> None:
        _check_choice(f"{_LOSS}.adv_estimator", self.adv_estimator, ADV_ESTIMATOR_NAMES)
        _check_choice(f"{_LOSS}.policy_loss", self.policy_loss, POLICY_LOSS_NAMES)
        _check_choice(f"{_LOSS}.loss_agg_mode", self.loss_agg_mode, LOSS_AGG_NAMES)
        _check_choice(f"{_LOSS}.kl_estimator", self.kl_estimator, KL_ESTIMATOR_NAMES)
        _check_loss_at_least("adv_eps", self.adv_eps, 0.0, strict=True)
        if not 0.0 <= self.clip_eps_low < 1.0:
            raise ConfigError(f"{_LOSS}.clip_eps_low", self.clip_eps_low, "a number in [0, 1) so that 1 - eps > 0")
        _check_loss_at_least("clip_eps_high", self.clip_eps_high, 0.0)
        if self.clip_ratio_c is not None and self.clip_ratio_c <= 1.0:
            raise ConfigError(f"{_LOSS}.clip_ratio_c", self.clip_ratio_c, "None (off) or a number > 1, e.g. 3.0")
        _check_loss_at_least("kl_coef", self.kl_coef, 0.0)
        _check_loss_at_least("entropy_coef", self.entropy_coef, 0.0)
        if self.max_response_length is not None and self.max_response_length <= 0:
            raise ConfigError(f"{_LOSS}.max_response_length", self.max_response_length, "None or a positive int")
        if self.rollout_correction is not None:
            _check_choice(f"{_LOSS}.rollout_correction", self.rollout_correction, ROLLOUT_CORRECTION_NAMES)
        _check_loss_at_least("rollout_is_cap", self.rollout_is_cap, 1.0)
        if self.loss_agg_mode == "seq-mean-token-sum-norm" and self.max_response_length is None:
            raise ConfigError(
                f"{_LOSS}.max_response_length",
                None,
                "a positive int (the generation limit) when loss_agg_mode is seq-mean-token-sum-norm",
            )


@dataclass
class GRPOConfig:
    """The GRPO stage: rollouts per step, sampling, update passes, sampling controls and evaluation.

    One step samples ``group_size`` responses for each of ``prompts_per_step`` prompts (split over data-parallel
    ranks), scores them, then makes ``ppo_epochs * mini_batches`` optimizer updates on that rollout batch with
    the sampling-time log-probabilities as the old policy. ``optim.train_steps`` counts GRPO steps.
    """

    prompts_per_step: int = 8
    """Prompts per step over all data-parallel ranks."""
    group_size: int = 8
    """Responses sampled per prompt (G); advantages are relative to the group."""
    max_new_tokens: int = 256
    """Response length limit in tokens (the forced prefix is part of the prompt)."""
    temperature: float = 1.0
    """Rollout temperature (training-time log-probabilities use the same temperature)."""
    top_p: float = 1.0
    """Rollout nucleus sampling (1: off, which keeps the sampling distribution equal to the policy)."""
    top_k: int = 0
    """Rollout top-k (0: off)."""
    prefix: str = "<think>\n"
    """Forced start of every response, appended to the prompt (R1's recommendation)."""
    system_prompt: str | None = None
    """A system turn before every prompt (rollouts, evaluation, rejection sampling, export checks); None: the
    chat template's own default. A pretrained chat model that has never seen R1's format learns it from an
    example here (``conf/pipeline/smollm2.yaml``)."""
    ppo_epochs: int = 1
    """Passes over each rollout batch."""
    mini_batches: int = 1
    """Optimizer updates per pass (the rollout batch is split into this many mini-batches)."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: drop groups whose rewards are all equal and sample new prompts to refill."""
    max_sampling_rounds: int = 3
    """Sampling rounds per step with dynamic sampling; after the last, zero-variance groups fill the batch."""
    overlong_filter: bool = False
    """DAPO's overlong filtering: responses cut by the length limit carry no loss."""
    rollout_batch: int | None = None
    """Continuous batching in the rollout: at most this many responses decode at once, and a finished one is
    replaced by a waiting one, so the batch stays full (None: all of a step's responses in one batch, which
    shrinks as they finish). Each response is then drawn from its own seed (taken from the sampler), so the
    samples differ from the default path's: off by default to keep runs bit-identical to earlier ones. The
    generation jobs (``r1mega-eval``, evaluation after training, rejection sampling) use it too."""
    rollout_row_groups: int | None = None
    """Row groups in flight in the rollout under pipeline parallelism: the rollout batch is split into this many
    groups, and while one stage decodes a group's token the next stage works on the group before (as 1F1B does
    with micro-batches), so stages do not wait for each other every token. None: one group per pipeline stage
    (PP); 1: the whole batch as one group (each token visits the stages in turn). Without pipeline parallelism
    more than one group decodes the groups in turn, which only the equivalence tests want. The generation jobs
    use it too. The default loop only (not with ``rollout_batch`` or ``speculative``)."""
    rollout_compile: bool = False
    """The rollout's one-token decode steps compiled by ``torch.compile`` (inductor fuses the norms, RoPE,
    softmax and activations between the matmuls; dynamic shapes, so one compilation serves every batch size and
    length). On the CPU with the model whole on each process (TP = PP = EP = 1); on CUDA the decode step is
    replayed as CUDA graphs instead. One compiled function serves every layer, so compiling takes about as long
    for a deep model as for a shallow one (13 s for SmolLM2-135M on 2 cores; less when torch's compile cache has
    it): it pays in runs that decode for minutes, not in a short test. The generation jobs use it too."""
    speculative: bool = False
    """MTP speculative decoding in the rollout: the model's multi-token-prediction module drafts a token that
    the policy verifies in its next forward, with the exact acceptance rule (samples keep the policy's
    distribution; log-probabilities are the policy's). Needs model.mtp_num_layers >= 1 and TP = EP = 1. RL
    does not train MTP unless ``mtp_loss_coef > 0``; without it acceptance falls as the policy moves away from
    the weights MTP learned with."""
    mtp_loss_coef: float = 0.0
    """Keeps the model's multi-token-prediction module trained during RL: the MTP cross entropy on the policy's own
    sampled responses (every depth, per response token, normalised like ``loss_agg_mode=token-mean``) is added to
    the loss with this weight, and ``mtp_loss`` / ``mtp_acc`` (depth 1 top-1 accuracy on the step's fresh
    rollouts) are logged. 0: MTP is neither run nor trained in the update (it goes stale). Needs
    model.mtp_num_layers >= 1."""
    micro_batch_tokens: int | None = None
    """Token-budget micro-batches for the update and the log-probability passes: responses (prompt + response) are
    packed end to end, longest first, into rows of at most this many tokens, one row per micro-batch, with
    per-response positions and attention (no padding computed; the same loss as the padded rows).
    ``optim.micro_batch_size`` is then unused by GRPO. None: ``optim.micro_batch_size`` responses per
    micro-batch, each right-padded to the longest."""
    eval_samples: int = 4
    """Samples per held-out prompt in evaluation (pass@1 is averaged over them; cons@k votes over them)."""
    eval_prompts: int = 0
    """Held-out prompts per evaluation (0: all of data.eval_path)."""
    eval_temperature: float = 0.6
    """Evaluation temperature (R1's protocol: 0.6)."""
    eval_top_p: float = 0.95
    """Evaluation nucleus sampling (R1's protocol: 0.95)."""
    eval_max_new_tokens: int | None = None
    """Evaluation length limit (None: max_new_tokens)."""
    loss: GRPOLossConfig = field(default_factory=GRPOLossConfig)
    """Advantages, policy loss, aggregation, KL and entropy (``r1mega.rl``)."""

    def __post_init__(self) -> None:
        for key in ("prompts_per_step", "group_size", "max_new_tokens", "ppo_epochs", "mini_batches"):
            _check_positive(f"grpo.{key}", getattr(self, key))
        _check_positive("grpo.max_sampling_rounds", self.max_sampling_rounds)
        _check_positive("grpo.eval_samples", self.eval_samples)
        _check_positive("grpo.eval_max_new_tokens", self.eval_max_new_tokens, allow_none=True)
        _check_positive("grpo.rollout_batch", self.rollout_batch, allow_none=True)
        _check_positive("grpo.rollout_row_groups", self.rollout_row_groups, allow_none=True)
        if self.rollout_row_groups is not None and (self.rollout_batch is not None or self.speculative):
            raise ConfigError(
                "grpo.rollout_row_groups",
                self.rollout_row_groups,
                "null with grpo.rollout_batch or grpo.speculative (the per-row loop has no row groups)",
            )
        _check_positive("grpo.micro_batch_tokens", self.micro_batch_tokens, allow_none=True)
        if self.mtp_loss_coef < 0:
            raise ConfigError("grpo.mtp_loss_coef", self.mtp_loss_coef, "0 (MTP not trained in RL) or more")
        if self.eval_prompts < 0:
            raise ConfigError("grpo.eval_prompts", self.eval_prompts, "0 (all) or more")
        for key in ("temperature", "eval_temperature"):
            if getattr(self, key) < 0:
                raise ConfigError(f"grpo.{key}", getattr(self, key), "0 (greedy) or more")
        for key in ("top_p", "eval_top_p"):
            if not 0 < getattr(self, key) <= 1:
                raise ConfigError(f"grpo.{key}", getattr(self, key), "a number in (0, 1]")
        if self.temperature == 0:
            raise ConfigError("grpo.temperature", 0, "> 0: greedy rollouts give a group no variety to compare")
        if self.top_k < 0:
            raise ConfigError("grpo.top_k", self.top_k, "0 (off) or more")
        if self.group_size < 2 and self.loss.adv_estimator != "dr_grpo":
            raise ConfigError(
                "grpo.group_size", self.group_size, "at least 2 (advantages compare responses in a group)"
            )

    @property
    def updates_per_step(self) -> int:
        """Optimizer updates one GRPO step makes."""
        return self.ppo_epochs * self.mini_batches


REWARD_START_METHODS = ("forkserver", "spawn")
REWARD_MODEL_NORMALIZE = ("group_winrate", "sigmoid", "zscore", "none")
"""``r1mega.rewards.reward_model.NORMALIZERS`` (named here so that composing a config never imports torch)."""
REWARD_REQUIRES: dict[str, tuple[str, ...]] = {
    "accuracy": (),
    "format": (),
    "language": (),
    "length": ("accuracy",),
    "overlong": (),
    "reward_model": (),
}
"""The rewards registered in ``r1mega.rewards`` -> the rewards each needs (``RewardSpec.requires``). Named here
so that config stays below the rewards package; tests/rewards/test_registry.py checks it equals the registry."""


@dataclass
class RewardConfig:
    """Rule-based rewards of the GRPO stage and the verifier worker pool that computes them (``r1mega.rewards``)."""

    weights: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "format": 1.0, "language": 1.0})
    """Reward name -> weight of its value in the scalar reward (weight 0: computed and logged only). R1 sums
    accuracy and format (R1-Zero) and adds language consistency in its reasoning RL stage. Registered names:
    accuracy (0/1), format (0/1), language (share in [0, 1]), overlong (DAPO, [-1, 0]) and length
    (Kimi-1.5, [-0.5, 0.5] within a group; needs accuracy), and reward_model (a trained reward model, see
    reward_model_path; [0, 1] with the default normalisation). A config override adds keys to the defaults,
    so set a default reward to 0 to turn it off."""
    time_limit_s: float = 1.0
    """Hard wall-time limit of one answer verification; past it the answer scores 0 (the worker is killed if
    it does not stop by itself)."""
    num_workers: int = 4
    """Verifier worker processes per trainer process; a batch takes about ceil(samples / num_workers) x the
    per-sample verification time, bounded by time_limit_s per sample."""
    start_method: str = "forkserver"
    """How verifier workers start: forkserver (math-verify preloaded once, replacements in milliseconds) or
    spawn. Never fork: the trainer holds threads."""
    worker_memory_mb: int | None = 2048
    """Address-space limit of each verifier worker in MiB (an answer that needs more scores 0); None: no limit."""
    max_answer_chars: int = 1000
    """A final answer longer than this scores 0 without being parsed; only the answer is sent to the workers."""
    overlong_buffer_tokens: int = 4096
    """DAPO's L_cache: the overlong penalty ramps from 0 to -1 over the last this-many tokens before L_max."""
    overlong_max_tokens: int | None = None
    """DAPO's L_max; None: each sample's generation limit (``RewardInput.max_tokens``)."""
    reward_model_path: str | None = None
    """Reward-model checkpoint of the reward_model reward (a ``step_*`` folder of a stage=reward_model run, or
    its checkpoints folder, whose ``latest`` is used). Its architecture comes from its meta.json; it is built
    in this run's parallel layout and runs in the trainer process. Needed when reward.weights has reward_model."""
    reward_model_normalize: str = "group_winrate"
    """How raw reward-model scores of one GRPO group become rewards: group_winrate (mean Bradley-Terry win
    probability against the rest of the group, in (0, 1), offset-free), sigmoid, zscore (within the group) or
    none (``r1mega.rewards.reward_model``)."""
    reward_model_batch_size: int = 8
    """Responses per reward-model forward."""

    def __post_init__(self) -> None:
        for name, weight in self.weights.items():
            if name not in REWARD_REQUIRES:
                raise ConfigError(
                    f"reward.weights.{name}",
                    weight,
                    f"a weight of a registered reward: {', '.join(sorted(REWARD_REQUIRES))}",
                )
            if not isinstance(weight, int | float) or not math.isfinite(weight):
                raise ConfigError(f"reward.weights.{name}", weight, "a finite number")
            for needed in REWARD_REQUIRES[name]:
                if needed not in self.weights:
                    raise ConfigError(
                        f"reward.weights.{needed}",
                        None,
                        f"a weight (0 to only compute it): reward.weights.{name} needs it",
                    )
        _check_positive("reward.time_limit_s", self.time_limit_s)
        _check_positive("reward.num_workers", self.num_workers)
        _check_choice("reward.start_method", self.start_method, REWARD_START_METHODS)
        _check_positive("reward.worker_memory_mb", self.worker_memory_mb, allow_none=True)
        _check_positive("reward.max_answer_chars", self.max_answer_chars)
        _check_positive("reward.overlong_buffer_tokens", self.overlong_buffer_tokens)
        _check_positive("reward.overlong_max_tokens", self.overlong_max_tokens, allow_none=True)
        _check_choice("reward.reward_model_normalize", self.reward_model_normalize, REWARD_MODEL_NORMALIZE)
        _check_positive("reward.reward_model_batch_size", self.reward_model_batch_size)
        if "reward_model" in self.weights and self.reward_model_path is None:
            raise ConfigError(
                "reward.reward_model_path", None, "a reward-model checkpoint when reward.weights has reward_model"
            )


def _check_sampling(group: str, temperature: float, top_p: float) -> None:
    if temperature < 0:
        raise ConfigError(f"{group}.temperature", temperature, "0 (greedy) or more")
    if not 0 < top_p <= 1:
        raise ConfigError(f"{group}.top_p", top_p, "a number in (0, 1]")


@dataclass
class RejectionConfig:
    """Rejection sampling (``r1mega-rejection-sample``): sample from a checkpoint, keep the correct, clean
    responses and write them as an SFT set. With a teacher's checkpoint and model it writes distillation
    traces (``conf/rejection/distill.yaml``). Responses start after the forced prefix ``grpo.prefix``; the
    answer checks use the ``reward`` group's verifier settings."""

    prompts_path: str | None = None
    """Prompt JSONL to sample for (``r1mega.data.prompts`` formats); None: ``data.train_path``."""
    max_prompts: int = 0
    """Use the first this-many prompts of the file (0: all)."""
    samples_per_prompt: int = 4
    """Responses sampled per prompt."""
    temperature: float = 0.6
    """Sampling temperature (R1's recommendation: 0.6)."""
    top_p: float = 0.95
    """Nucleus sampling (R1's recommendation: 0.95)."""
    max_new_tokens: int = 512
    """Generation limit in tokens; a response cut by it never passes ``require_format``."""
    batch_size: int = 16
    """Prompts per generation call on one data-parallel rank (each with ``samples_per_prompt`` rows): bounds
    the KV cache."""
    require_correct: bool = True
    """Keep only responses whose final answer the task's verifier accepts (the ``accuracy`` reward)."""
    require_format: bool = True
    """Keep only finished responses in R1's format: one ``<think>...</think>`` block, then a non-empty answer."""
    min_language_share: float = 0.95
    """Keep only responses whose reasoning has at least this share of words in the prompt's script (the
    ``language`` reward; R1 drops mixed-language chains of thought). 0 turns the filter off."""
    min_response_tokens: int = 0
    """Drop responses with fewer generated tokens (reasoning and answer) than this."""
    max_response_tokens: int | None = None
    """Drop responses with more generated tokens than this (None: only ``max_new_tokens`` bounds them)."""
    dedupe: bool = True
    """Keep one of the responses to a prompt whose reasoning texts are identical (the lowest sample index)."""
    max_per_prompt: int = 0
    """Keep at most this many responses per prompt, the highest total reward first (ties: the shorter, then
    the lower sample index); 0 keeps every response that passes. Distillation traces use 1."""
    output_dir: str | None = None
    """Folder for ``train.jsonl`` (the SFT set) and ``summary.json``; None: ``<run_dir>/rejection_sampling``."""

    def __post_init__(self) -> None:
        for key in ("samples_per_prompt", "max_new_tokens", "batch_size"):
            _check_positive(f"rejection.{key}", getattr(self, key))
        _check_sampling("rejection", self.temperature, self.top_p)
        for key in ("max_prompts", "min_response_tokens", "max_per_prompt"):
            if getattr(self, key) < 0:
                raise ConfigError(f"rejection.{key}", getattr(self, key), "0 (off) or more")
        if not 0 <= self.min_language_share <= 1:
            raise ConfigError("rejection.min_language_share", self.min_language_share, "a share in [0, 1] (0: off)")
        if self.max_response_tokens is not None and self.max_response_tokens < max(self.min_response_tokens, 1):
            raise ConfigError(
                "rejection.max_response_tokens",
                self.max_response_tokens,
                f"null or at least rejection.min_response_tokens={self.min_response_tokens} (and 1)",
            )


@dataclass
class EvalConfig:
    """``r1mega-eval``: DeepSeek-R1's evaluation protocol on ``eval.prompts_path`` (else ``data.eval_path``) for
    the weights of ``checkpoint.load`` (pass@1 averaged over k samples, cons@k, per-task accuracy, format rate, length).
    Responses start after the forced prefix ``grpo.prefix``. (The GRPO stage's periodic evaluation has its
    own ``grpo.eval_*`` settings.)"""

    samples: int = 4
    """Samples per prompt (k): pass@1 is averaged over them, cons@k votes over their answers."""
    temperature: float = 0.6
    """Sampling temperature (R1's protocol: 0.6)."""
    top_p: float = 0.95
    """Nucleus sampling (R1's protocol: 0.95)."""
    max_new_tokens: int = 512
    """Generation limit in tokens."""
    max_prompts: int = 0
    """Evaluate the first this-many prompts of ``data.eval_path`` (0: all)."""
    batch_size: int = 16
    """Prompts per generation call on one data-parallel rank (each with ``samples`` rows): bounds the KV cache."""
    output_dir: str | None = None
    """Folder for ``eval.json``, ``eval.md`` and ``samples.jsonl``; None: ``<run_dir>/eval``."""
    prompts_path: str | None = None
    """Prompt JSONL to evaluate on; None: ``data.eval_path`` (a training stage's ``data.eval_path`` is its
    held-out loss set, so ``after_training`` names the prompts here)."""
    after_training: bool = False
    """``r1mega-train``: evaluate the final checkpoint with this protocol in the same processes before exiting
    (what the pipeline does after every training step: one process start less than ``r1mega-eval``)."""

    def __post_init__(self) -> None:
        for key in ("samples", "max_new_tokens", "batch_size"):
            _check_positive(f"eval.{key}", getattr(self, key))
        _check_sampling("eval", self.temperature, self.top_p)
        if self.max_prompts < 0:
            raise ConfigError("eval.max_prompts", self.max_prompts, "0 (all) or more")
