"""Typed schemas for every Hydra config group.

Each group is a dataclass registered in Hydra's ConfigStore (see ``r1mega.config.store``);
the YAML files under ``conf/<group>/`` only state what differs from the defaults written here.
Defaults live in exactly one place: this file, and ``r1mega.config.schema_rl`` for the RL and generation
groups (grpo, reward, rejection, eval), re-exported here. The attribute docstring under each field is its
documentation.

Per-group checks live in ``__post_init__`` (they run when ``OmegaConf.to_object`` builds the
typed object); checks that need several groups live in ``r1mega.config.validate``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from r1mega.config.checks import check_choice as _check_choice
from r1mega.config.checks import check_positive as _check_positive
from r1mega.config.errors import ConfigError
from r1mega.config.schema_rl import (  # noqa: F401  (re-exported: every group's schema is importable from here)
    ADV_ESTIMATOR_NAMES,
    KL_ESTIMATOR_NAMES,
    LOSS_AGG_NAMES,
    POLICY_LOSS_NAMES,
    REWARD_MODEL_NORMALIZE,
    REWARD_REQUIRES,
    REWARD_START_METHODS,
    EvalConfig,
    GRPOConfig,
    GRPOLossConfig,
    RejectionConfig,
    RewardConfig,
)

FAMILIES = ("deepseek_v3", "qwen2", "llama")
DTYPES = ("fp32", "bf16")
FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
FP8_BACKENDS = ("auto", "te", "torch")


REQUIRED_MODEL_FIELDS = ("family", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "vocab_size")
"""ModelConfig fields without a default."""


@dataclass
class ModelConfig:
    """Architecture of the model; one preset per file in ``conf/model/``.

    The sizes (and the family) have no default: each preset states them. The MLA, yarn and MoE knobs default to
    DeepSeek-V3's values and act only when that feature is switched on; the rest are megatron-core's defaults.
    """

    name: str = "custom"
    """Preset name, used in logs and checkpoint metadata."""
    family: str = MISSING
    """Model family in the registry: deepseek_v3 (MLA + MoE), qwen2 or llama (dense students). Required."""
    num_layers: int = MISSING
    """Number of transformer layers (not counting MTP layers). Required."""
    hidden_size: int = MISSING
    """Model width. Required."""
    ffn_hidden_size: int = MISSING
    """Intermediate size of the dense (non-MoE) SwiGLU MLP. Required."""
    num_attention_heads: int = MISSING
    """Attention heads. Required."""
    num_query_groups: int | None = None
    """Key/value heads for grouped-query attention; None means one per attention head (MHA)."""
    kv_channels: int | None = None
    """Per-head dimension for standard attention; None means hidden_size / num_attention_heads."""
    vocab_size: int = MISSING
    """Tokenizer vocabulary size (before padding). Required."""
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
    moe_experts: str = "auto"
    """How the routed experts run: grouped (two grouped GEMMs per layer: Transformer Engine's TEGroupedMLP, or
    ``torch._grouped_mm`` in the local spec), sequential (megatron-core's SequentialMLP, one expert at a time),
    or auto: grouped with Transformer Engine or a bf16 Hopper GPU, sequential otherwise (the CPU, fp32, the
    torch FP8 backend). Both write the same checkpoint, so a run resumes with the other setting (except the
    distributed optimizer's layout-bound dp_reshardable format); one seed initialises them differently."""

    mtp_num_layers: int = 0
    """Multi-token prediction layers (DeepSeek-V3: 1)."""
    mtp_loss_scaling_factor: float = 0.1
    """Weight of the MTP loss."""

    def __post_init__(self) -> None:
        if any(getattr(self, key) == MISSING for key in REQUIRED_MODEL_FIELDS):
            return  # the unfilled schema (R1Config's default); loading a config without a preset's sizes is refused
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
        _check_choice("model.moe_experts", self.moe_experts, ("auto", "grouped", "sequential"))
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
    recompute_granularity: str | None = None
    """Activation recompute (megatron-core's): null keeps every activation for the backward pass; selective
    recomputes the submodules in ``recompute_modules``; full recomputes whole layers (``recompute_method``).
    Chosen with the layout, since it trades compute for the activation memory a rank has."""
    recompute_method: str | None = None
    """For full recompute: uniform (every ``recompute_num_layers`` layers form one recomputed unit) or block (the
    first ``recompute_num_layers`` layers of each pipeline stage are recomputed)."""
    recompute_num_layers: int | None = None
    """For full recompute: layers per unit (uniform) or recomputed layers per stage (block)."""
    recompute_modules: list[str] = field(default_factory=lambda: ["core_attn"])
    """For selective recompute, megatron-core's module names: core_attn, mla_up_proj, layernorm, mlp, moe,
    shared_experts (moe_act needs grouped GEMM experts)."""

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
        self._check_recompute()

    def _check_recompute(self) -> None:
        _check_choice("parallel.recompute_granularity", self.recompute_granularity, (None, "selective", "full"))
        _check_choice("parallel.recompute_method", self.recompute_method, (None, "uniform", "block"))
        if self.recompute_granularity == "full":
            if self.recompute_method is None:
                raise ConfigError("parallel.recompute_method", None, "uniform or block with recompute_granularity=full")
            _check_positive("parallel.recompute_num_layers", self.recompute_num_layers)
        elif self.recompute_method is not None or self.recompute_num_layers is not None:
            key = "recompute_method" if self.recompute_method is not None else "recompute_num_layers"
            raise ConfigError(f"parallel.{key}", getattr(self, key), "null unless parallel.recompute_granularity=full")
        allowed = ("core_attn", "mla_up_proj", "layernorm", "mlp", "moe", "shared_experts", "moe_act")
        for name in self.recompute_modules:
            _check_choice("parallel.recompute_modules", name, allowed)

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
    """FP8 format for linear layers: e4m3 (every tensor, DeepSeek-V3's choice with fine-grained scaling) or
    hybrid (e5m2 gradients; Transformer Engine only)."""
    fp8_recipe: str = "delayed"
    """FP8 scaling recipe: delayed, tensorwise, blockwise or mxfp8 (TE); the torch backend implements blockwise
    (DeepSeek-V3's 1x128 activation tiles and 128x128 weight blocks)."""
    fp8_backend: str = "auto"
    """Who runs FP8: te (Transformer Engine layers), torch (r1mega's blockwise FP8 linears in megatron-core's
    local spec, through torch's scaled matmul on Hopper and an fp32 emulation elsewhere, CPU included) or auto
    (te when Transformer Engine imports on a CUDA GPU, else torch)."""
    transformer_impl: str = "auto"
    """Layer implementation: auto (TE when importable on a GPU), transformer_engine or local."""
    grad_reduce_in_fp32: bool = True
    """Accumulate and reduce gradients in fp32."""

    def __post_init__(self) -> None:
        _check_choice("precision.dtype", self.dtype, DTYPES)
        _check_choice("precision.fp8", self.fp8, (None,) + FP8_FORMATS)
        _check_choice("precision.fp8_recipe", self.fp8_recipe, FP8_RECIPES)
        _check_choice("precision.transformer_impl", self.transformer_impl, ("auto", "transformer_engine", "local"))
        _check_choice("precision.fp8_backend", self.fp8_backend, FP8_BACKENDS)
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
    verify: bool = True
    """Check every file of a checkpoint against the size and CRC-32 its meta.json records before loading it
    (resume and checkpoint.load; about one more read of the checkpoint, each rank its own shards). A damaged
    newest checkpoint is skipped for the newest intact one; damaged checkpoint.load weights exit with status 2.
    false resumes without the check (checkpoint.load is still checked; saves record the checksums either way)."""

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
    deterministic: bool = False
    """Deterministic CUDA kernels (``torch.use_deterministic_algorithms``, a fixed cuBLAS workspace, megatron's
    ``deterministic_mode``): slower, for bit-exact reruns and resumes on a GPU. The CPU is deterministic anyway."""
    run_dir: str = "runs/default"
    """Where logs, TensorBoard and checkpoints go."""
