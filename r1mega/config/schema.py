"""Typed schemas for every Hydra config group.

Each group is a dataclass registered in Hydra's ConfigStore (see ``r1mega.config.store``);
the YAML files under ``conf/<group>/`` only state what differs from the defaults written here.
Defaults live in exactly one place: this file. The attribute docstring under each field is its
documentation.

Per-group checks live in ``__post_init__`` (they run when ``OmegaConf.to_object`` builds the
typed object); checks that need several groups live in ``r1mega.config.validate``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from r1mega.config.errors import ConfigError

FAMILIES = ("deepseek_v3", "qwen2", "llama")
DTYPES = ("fp32", "bf16")
FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")


def _check_choice(key: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(key, value, f"one of {', '.join(map(str, choices))}")


def _check_positive(key: str, value: float | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise ConfigError(key, value, "a positive number")


@dataclass
class ModelConfig:
    """Architecture of the model; one preset per file in ``conf/model/``."""

    name: str = "custom"
    """Preset name, used in logs and checkpoint metadata."""
    family: str = "deepseek_v3"
    """Model family in the registry: deepseek_v3 (MLA + MoE), qwen2 or llama (dense students)."""
    num_layers: int = 2
    """Number of transformer layers (not counting MTP layers)."""
    hidden_size: int = 64
    """Model width."""
    ffn_hidden_size: int = 256
    """Intermediate size of the dense (non-MoE) SwiGLU MLP."""
    num_attention_heads: int = 4
    """Attention heads."""
    num_query_groups: int | None = None
    """Key/value heads for grouped-query attention; None means one per attention head (MHA)."""
    kv_channels: int | None = None
    """Per-head dimension for standard attention; None means hidden_size / num_attention_heads."""
    vocab_size: int = 512
    """Tokenizer vocabulary size (before padding)."""
    make_vocab_size_divisible_by: int = 64
    """The embedding is padded to a multiple of this. Independent of TP so checkpoints reshard."""
    max_position_embeddings: int = 4096
    """Longest sequence the position encoding is built for."""
    norm_epsilon: float = 1e-6
    """RMSNorm epsilon."""
    init_method_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""
    tie_word_embeddings: bool = False
    """Share the input embedding and the output layer."""
    add_qkv_bias: bool = False
    """Bias on the Q/K/V projections (Qwen2)."""
    rotary_base: float = 10000.0
    """RoPE theta."""
    rope_scaling: str | None = None
    """RoPE scaling: None, 'llama3' (Llama 3.1 frequency scaling) or 'yarn' (DeepSeek-V3, MLA only)."""
    rope_scaling_factor: float = 1.0
    """Context extension factor of the RoPE scaling (llama3: 8, yarn: 40 for DeepSeek-V3)."""
    original_max_position_embeddings: int = 4096
    """Pre-extension context length used by yarn."""
    yarn_beta_fast: float = 32.0
    """Yarn beta_fast."""
    yarn_beta_slow: float = 1.0
    """Yarn beta_slow."""
    yarn_mscale: float = 1.0
    """Yarn mscale."""
    yarn_mscale_all_dim: float = 0.0
    """Yarn mscale_all_dim (DeepSeek-V3: 1.0)."""

    multi_latent_attention: bool = False
    """Use Multi-Head Latent Attention (low-rank compressed KV with decoupled RoPE)."""
    q_lora_rank: int | None = None
    """MLA query compression rank; None means queries are projected directly (no q-LoRA)."""
    kv_lora_rank: int = 512
    """MLA key/value latent rank (the part of the KV cache that is not the RoPE key)."""
    qk_head_dim: int = 128
    """MLA per-head query/key dimension without RoPE ("nope")."""
    qk_pos_emb_head_dim: int = 64
    """MLA decoupled RoPE key/query dimension, shared by all heads for the key."""
    v_head_dim: int = 128
    """MLA per-head value dimension."""

    num_experts: int | None = None
    """Routed experts per MoE layer; None means a dense model."""
    moe_ffn_hidden_size: int | None = None
    """Intermediate size of each routed expert."""
    moe_router_topk: int = 2
    """Routed experts chosen per token."""
    moe_shared_expert_intermediate_size: int | None = None
    """Total intermediate size of the shared experts (n_shared x expert size); None: no shared expert."""
    moe_first_k_dense: int = 0
    """The first k layers use the dense MLP instead of MoE (DeepSeek-V3: 3)."""
    moe_router_score_function: str = "softmax"
    """Router score function: softmax or sigmoid (DeepSeek-V3)."""
    moe_router_num_groups: int | None = None
    """Expert groups for group-limited routing; None disables it."""
    moe_router_group_topk: int | None = None
    """Groups each token may route to under group-limited routing."""
    moe_router_topk_scaling_factor: float | None = None
    """Routed scaling factor applied to the top-k weights (DeepSeek-V3: 2.5)."""
    moe_router_enable_expert_bias: bool = False
    """Aux-loss-free load balancing: a per-expert bias added to scores for selection only."""
    moe_router_bias_update_rate: float = 1e-3
    """Step size of the expert bias update (DeepSeek-V3's gamma)."""
    moe_router_load_balancing_type: str = "none"
    """Auxiliary balancing loss: none, aux_loss, seq_aux_loss (DeepSeek-V3) or global_aux_loss."""
    moe_aux_loss_coeff: float = 0.0
    """Weight of the auxiliary balancing loss (DeepSeek-V3: 1e-4, sequence-wise)."""
    moe_token_dispatcher_type: str = "alltoall"
    """Token dispatcher: alltoall or allgather."""

    mtp_num_layers: int = 0
    """Multi-token prediction layers (DeepSeek-V3: 1)."""
    mtp_loss_scaling_factor: float = 0.1
    """Weight of the MTP loss."""

    def __post_init__(self) -> None:
        _check_choice("model.family", self.family, FAMILIES)
        for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "vocab_size"):
            _check_positive(f"model.{key}", getattr(self, key))
        _check_choice("model.rope_scaling", self.rope_scaling, (None, "llama3", "yarn"))
        _check_choice("model.moe_router_score_function", self.moe_router_score_function, ("softmax", "sigmoid"))
        _check_choice(
            "model.moe_router_load_balancing_type",
            self.moe_router_load_balancing_type,
            ("none", "aux_loss", "seq_aux_loss", "global_aux_loss"),
        )
        _check_choice("model.moe_token_dispatcher_type", self.moe_token_dispatcher_type, ("alltoall", "allgather"))
        if self.num_query_groups is not None and self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                "model.num_query_groups",
                self.num_query_groups,
                f"a divisor of model.num_attention_heads={self.num_attention_heads}",
            )
        if self.rope_scaling == "yarn" and not self.multi_latent_attention:
            raise ConfigError(
                "model.rope_scaling", "yarn", "yarn only with model.multi_latent_attention=true (use llama3 or null)"
            )
        if self.num_experts is not None:
            _check_positive("model.num_experts", self.num_experts)
            _check_positive("model.moe_ffn_hidden_size", self.moe_ffn_hidden_size)
            if not 1 <= self.moe_router_topk <= self.num_experts:
                raise ConfigError(
                    "model.moe_router_topk", self.moe_router_topk, f"between 1 and model.num_experts={self.num_experts}"
                )
            if not 0 <= self.moe_first_k_dense < self.num_layers:
                raise ConfigError(
                    "model.moe_first_k_dense",
                    self.moe_first_k_dense,
                    f"between 0 and model.num_layers-1={self.num_layers - 1}",
                )
            if (self.moe_router_num_groups is None) != (self.moe_router_group_topk is None):
                raise ConfigError(
                    "model.moe_router_group_topk",
                    self.moe_router_group_topk,
                    "set together with model.moe_router_num_groups (both or neither)",
                )
            if self.moe_router_num_groups is not None and self.num_experts % self.moe_router_num_groups:
                raise ConfigError(
                    "model.moe_router_num_groups",
                    self.moe_router_num_groups,
                    f"a divisor of model.num_experts={self.num_experts}",
                )
            if self.moe_router_enable_expert_bias and self.moe_router_score_function != "sigmoid":
                raise ConfigError(
                    "model.moe_router_enable_expert_bias",
                    True,
                    "only with model.moe_router_score_function=sigmoid (as DeepSeek-V3)",
                )
        elif self.moe_first_k_dense or self.moe_shared_expert_intermediate_size:
            raise ConfigError(
                "model.num_experts",
                None,
                "a number of experts when MoE options (moe_first_k_dense, shared experts) are set",
            )
        if self.mtp_num_layers < 0:
            raise ConfigError("model.mtp_num_layers", self.mtp_num_layers, "0 or more")

    @property
    def padded_vocab_size(self) -> int:
        """Vocabulary padded to ``make_vocab_size_divisible_by`` (the embedding's real row count)."""
        m = self.make_vocab_size_divisible_by
        return -(-self.vocab_size // m) * m

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def moe_layer_pattern(self) -> list[int]:
        """1 for an MoE layer, 0 for a dense one, per decoder layer."""
        if not self.is_moe:
            return [0] * self.num_layers
        return [0 if i < self.moe_first_k_dense else 1 for i in range(self.num_layers)]


@dataclass
class ParallelConfig:
    """Parallel layout. Data parallelism is what is left of the world size."""

    world_size: int | None = None
    """Expected number of processes. None: whatever the launcher starts. Set it to check a layout offline."""
    tensor_model_parallel_size: int = 1
    """Tensor parallelism (TP)."""
    pipeline_model_parallel_size: int = 1
    """Pipeline parallelism (PP)."""
    virtual_pipeline_model_parallel_size: int | None = None
    """Interleaved pipeline chunks per stage (VPP); None disables interleaving."""
    num_layers_in_first_pipeline_stage: int | None = None
    """Decoder layers on the first pipeline stage when the split is uneven (it also holds the embedding)."""
    num_layers_in_last_pipeline_stage: int | None = None
    """Decoder layers on the last pipeline stage when the split is uneven (it also holds output and MTP)."""
    context_parallel_size: int = 1
    """Context parallelism (CP)."""
    expert_model_parallel_size: int = 1
    """Expert parallelism (EP); experts are split over EP ranks carved out of DP x CP."""
    expert_tensor_parallel_size: int | None = None
    """Tensor parallelism inside experts (ETP); None means the same as TP."""
    sequence_parallel: bool = False
    """Sequence parallelism over the TP group (required for MoE with TP > 1)."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (ZeRO-1)."""
    overlap_grad_reduce: bool = False
    """Overlap the gradient reduce-scatter/all-reduce with the backward pass."""
    backend: str | None = None
    """torch.distributed backend; None: nccl with CUDA, gloo without."""
    timeout_minutes: int = 10
    """Collective timeout; a hung peer fails the run after this long."""

    def __post_init__(self) -> None:
        for key in (
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
            "context_parallel_size",
            "expert_model_parallel_size",
            "timeout_minutes",
        ):
            _check_positive(f"parallel.{key}", getattr(self, key))
        _check_positive("parallel.world_size", self.world_size, allow_none=True)
        _check_positive("parallel.expert_tensor_parallel_size", self.expert_tensor_parallel_size, allow_none=True)
        if self.virtual_pipeline_model_parallel_size is not None:
            _check_positive("parallel.virtual_pipeline_model_parallel_size", self.virtual_pipeline_model_parallel_size)
            if self.pipeline_model_parallel_size < 2:
                raise ConfigError(
                    "parallel.virtual_pipeline_model_parallel_size",
                    self.virtual_pipeline_model_parallel_size,
                    "null unless parallel.pipeline_model_parallel_size > 1",
                )
        _check_choice("parallel.backend", self.backend, (None, "gloo", "nccl"))

    @property
    def etp(self) -> int:
        return self.expert_tensor_parallel_size or self.tensor_model_parallel_size

    @property
    def vpp(self) -> int:
        return self.virtual_pipeline_model_parallel_size or 1

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size


@dataclass
class PrecisionConfig:
    """Numeric precision and layer implementation."""

    dtype: str = "fp32"
    """Parameter/compute dtype: fp32 or bf16 (bf16 keeps fp32 master weights in the optimizer)."""
    fp8: str | None = None
    """FP8 format for linear layers (e4m3 or hybrid); needs Transformer Engine on a GPU."""
    fp8_recipe: str = "delayed"
    """FP8 scaling recipe: delayed, tensorwise, blockwise or mxfp8."""
    transformer_impl: str = "auto"
    """Layer implementation: auto (TE when importable on a GPU), transformer_engine or local."""
    grad_reduce_in_fp32: bool = True
    """Accumulate and reduce gradients in fp32."""

    def __post_init__(self) -> None:
        _check_choice("precision.dtype", self.dtype, DTYPES)
        _check_choice("precision.fp8", self.fp8, (None,) + FP8_FORMATS)
        _check_choice("precision.fp8_recipe", self.fp8_recipe, FP8_RECIPES)
        _check_choice("precision.transformer_impl", self.transformer_impl, ("auto", "transformer_engine", "local"))
        if self.fp8 is not None and self.dtype != "bf16":
            raise ConfigError("precision.dtype", self.dtype, "bf16 when precision.fp8 is set")


@dataclass
class OptimConfig:
    """Optimizer, learning-rate schedule and batch sizes."""

    lr: float = 3e-4
    """Peak learning rate."""
    min_lr: float = 3e-5
    """Learning rate at the end of the decay."""
    weight_decay: float = 0.1
    """Decoupled weight decay."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.95
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clip; 0 disables clipping."""
    lr_warmup_steps: int = 0
    """Linear warmup steps."""
    lr_decay_style: str = "cosine"
    """Decay after warmup: cosine, linear or constant."""
    train_steps: int = 20
    """Optimizer steps to run."""
    micro_batch_size: int = 2
    """Sequences per forward/backward on one data-parallel rank."""
    global_batch_size: int = 4
    """Sequences per optimizer step over all data-parallel ranks (micro x accumulation x DP)."""

    def __post_init__(self) -> None:
        _check_positive("optim.lr", self.lr)
        _check_positive("optim.train_steps", self.train_steps)
        _check_positive("optim.micro_batch_size", self.micro_batch_size)
        _check_positive("optim.global_batch_size", self.global_batch_size)
        _check_choice("optim.lr_decay_style", self.lr_decay_style, ("cosine", "linear", "constant"))
        if self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError("optim.min_lr", self.min_lr, f"between 0 and optim.lr={self.lr}")
        if self.clip_grad < 0:
            raise ConfigError("optim.clip_grad", self.clip_grad, "0 (off) or a positive norm")
        if not 0 <= self.lr_warmup_steps < self.train_steps:
            raise ConfigError(
                "optim.lr_warmup_steps",
                self.lr_warmup_steps,
                f"at least 0 and below optim.train_steps={self.train_steps}",
            )


@dataclass
class CheckpointConfig:
    """Distributed checkpoints."""

    dir: str | None = None
    """Checkpoint folder; None means ``<run dir>/checkpoints``."""
    save_interval: int = 0
    """Save every N steps (0: only at the end and on preemption)."""
    keep_last: int = 2
    """Complete checkpoints to keep."""
    load: str | None = None
    """Checkpoint to start from (weights only) when the run has none of its own to resume."""
    optimizer_format: str = "dp_reshardable"
    """Distributed-optimizer state layout in checkpoints (megatron-core's distrib_optim_sharding_type); all
    resume bit-identically. dp_reshardable: each rank writes its own shard, no gather (megatron's default, the
    fastest at scale); loads at another DP size but the same TP/PP/EP/precision. fully_reshardable: gathered
    per model tensor over DP at each save; loads into any layout. dp_zero_gather_scatter: deprecated, gathers
    on DP rank 0. (fully_sharded_model_space cannot be saved by megatron-core 0.16.1.)"""
    resume: bool = True
    """Resume automatically from the newest complete checkpoint in the folder."""

    def __post_init__(self) -> None:
        _check_choice(
            "checkpoint.optimizer_format",
            self.optimizer_format,
            ("dp_reshardable", "fully_reshardable", "dp_zero_gather_scatter"),
        )
        if self.save_interval < 0:
            raise ConfigError("checkpoint.save_interval", self.save_interval, "0 or more")
        _check_positive("checkpoint.keep_last", self.keep_last)


@dataclass
class LoggingConfig:
    """Metrics and console output."""

    log_interval: int = 1
    """Log metrics every N steps."""
    tensorboard: bool = True
    """Write TensorBoard scalars under ``<run dir>/tb``."""
    progress_bar: bool = True
    """Show a progress bar on rank 0."""
    level: str = "INFO"
    """Python log level."""

    def __post_init__(self) -> None:
        _check_positive("logging.log_interval", self.log_interval)
        _check_choice("logging.level", self.level, ("DEBUG", "INFO", "WARNING", "ERROR"))


STAGES = ("pretrain", "sft", "grpo", "reward_model")


@dataclass
class StageConfig:
    """Which stage of the R1 pipeline runs, and its stage-level options."""

    name: str = "pretrain"
    """Stage: pretrain (next-token prediction on the data source), sft (supervised fine-tuning on chat JSONL:
    cold start, rejection-sampled data, distillation traces) or grpo (reinforcement learning with
    group-relative advantages and rule-based rewards; the ``grpo`` and ``reward`` groups configure it) or
    reward_model (a scalar head on the model trained with the Bradley-Terry loss on preference-pair JSONL;
    ``optim`` batch sizes count pairs; the ``reward_model`` reward of GRPO scores with the result)."""
    eval_interval: int = 0
    """Evaluate on the held-out split every N steps (0: never)."""
    eval_batches: int = 8
    """Micro-batches per DP rank used for one evaluation (at most the held-out split)."""
    max_consecutive_nonfinite: int = 5
    """Stop the run after this many non-finite losses or gradients in a row."""

    def __post_init__(self) -> None:
        _check_choice("stage.name", self.name, STAGES)
        if self.eval_interval < 0:
            raise ConfigError("stage.eval_interval", self.eval_interval, "0 (off) or more")
        _check_positive("stage.eval_batches", self.eval_batches)
        _check_positive("stage.max_consecutive_nonfinite", self.max_consecutive_nonfinite)


@dataclass
class DataConfig:
    """Training data."""

    source: str = "synthetic"
    """synthetic (a fixed random token stream with a learnable rule) or jsonl (chat/prompt-response JSONL)."""
    seq_length: int = 64
    """Tokens per training sequence (row)."""
    seed: int = 1234
    """Seed of data order and synthetic data."""
    train_path: str | None = None
    """JSONL training file (``messages`` or ``prompt``/``response``, optional ``reasoning``; preference pairs
    ``prompt``/``chosen``/``rejected`` for stage.name=reward_model)."""
    eval_path: str | None = None
    """JSONL held-out file for evaluation loss; None: no evaluation."""
    tokenizer: str | None = None
    """A local tokenizer directory or tokenizer.json (never fetched from a hub)."""
    packing: bool = True
    """Pack several documents into one row (attention and positions stay within each document)."""
    truncation: str = "drop"
    """Examples longer than seq_length: drop (counted and logged) or truncate (keeps the prompt)."""
    skip_malformed: bool = False
    """Skip and count malformed JSONL lines instead of failing on the first (file:line)."""

    def __post_init__(self) -> None:
        _check_choice("data.source", self.source, ("synthetic", "jsonl"))
        _check_positive("data.seq_length", self.seq_length)
        _check_choice("data.truncation", self.truncation, ("drop", "truncate"))
        if self.source == "jsonl":
            for key in ("train_path", "tokenizer"):
                if getattr(self, key) is None:
                    raise ConfigError(f"data.{key}", None, "a path when data.source=jsonl")


# The GRPO maths registered in r1mega.rl (tests/rl/test_config.py checks these match the registries; the
# names live here so that composing a config never imports torch).
ADV_ESTIMATOR_NAMES = ("dr_grpo", "grpo", "grpo_batch_norm", "rloo")
POLICY_LOSS_NAMES = ("gspo", "ppo")
LOSS_AGG_NAMES = ("seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "token-mean")
KL_ESTIMATOR_NAMES = ("k1", "k2", "k3", "low_var_kl")
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
        from r1mega.rewards import REWARDS  # here: the registry fills as the reward modules import

        for name, weight in self.weights.items():
            if name not in REWARDS:
                raise ConfigError(
                    f"reward.weights.{name}", weight, f"a weight of a registered reward: {', '.join(sorted(REWARDS))}"
                )
            if not isinstance(weight, int | float) or not math.isfinite(weight):
                raise ConfigError(f"reward.weights.{name}", weight, "a finite number")
            for needed in REWARDS[name].requires:
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


@dataclass
class R1Config:
    """The whole run: one field per config group."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    data: DataConfig = field(default_factory=DataConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rejection: RejectionConfig = field(default_factory=RejectionConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 1234
    """Seed of model initialisation."""
    run_dir: str = "runs/default"
    """Where logs, TensorBoard and checkpoints go."""
