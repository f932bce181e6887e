"""What a GRPO step costs one rank: memory beyond the model state, and rollout and update time.

Pure Python (no torch, no megatron-core), for ``r1mega-check ... stage=grpo``. It adds to ``memory.stage_memory``
(weights, gradients, optimizer) what RL puts on a rank of pipeline stage ``s``:

* **Reference model** (``grpo.loss.kl_coef > 0``): the frozen starting weights at the parameter dtype, laid out
  like the policy's.
* **Rollout KV cache**: the rollout runs in the training layout, each data-parallel replica on its share of the
  ``prompts_per_step x group_size`` sequences, each up to ``prompt_tokens + grpo.max_new_tokens`` long. MLA caches
  its latent, ``kv_lora_rank + qk_pos_emb_head_dim`` values per token and layer (576 for DeepSeek-V3, against
  2 x 128 x 192 = 49,152 for its heads uncompressed), replicated on tensor-parallel ranks (r1mega's local spec
  keeps MLA's down-projection replicated); GQA caches keys and values of its ``num_query_groups / TP`` groups.
* **Update activations**: micro-batches of whole sequences (prompt + response). Per layer and token, following
  Korthikanti et al. 2022 with a fused attention kernel (no s x s scores kept): ``34 h / TP`` bytes (bf16)
  without recompute or with selective recompute of core attention; ``2 h`` (the layer's input) with full
  recompute, plus one layer's ``34 h / TP`` for the micro-batch being recomputed. Under 1F1B, stage ``s`` holds
  ``min(PP - s, micro-batches)`` micro-batches in flight. MLA and MoE layers keep somewhat different sets: this
  is an estimate, good to a factor below 2, which is what a layout decision needs.

Time, from FLOPs and bandwidth (``Hardware``), the floor a perfect implementation would reach:

* **Rollout** (decode): per token, a pipeline stage's pass over a group of rows takes
  ``max(bytes read / HBM bandwidth, FLOPs / peak)``: its weights (every local expert is hit at these batch sizes)
  plus the group's KV cache, against 2 x activated parameters + attention FLOPs per row. With ``G`` row groups in
  flight (``grpo.rollout_row_groups``, default ``PP``) a token costs ``max(G, PP)`` passes per stage (stages in
  parallel, idle when ``G < PP``); with one group, ``PP`` passes in turn. Each pass re-reads the stage's weights,
  but the KV cache and the FLOPs split over the groups: ``G = PP`` groups cost the same as one group only when
  reading weights is everything, and up to ``PP`` times less otherwise.
* **Refit** (for comparison): the same rollout after resharding the weights into a generation layout without
  pipeline stages (attention TP within a node, routed experts over every rank, every row stepping at once), as
  NeMo-RL and verl do; it costs a second copy of each rank's share of the weights and a KV cache that holds every
  layer.
* **Update**: training FLOPs (3 x forward, 4 x with full recompute) over every token of the step, plus the
  reference forward, over all ranks at an assumed model-FLOPs utilisation.
"""

from __future__ import annotations

from dataclasses import dataclass

from r1mega.config.schema import R1Config
from r1mega.models.memory import MemoryEstimate, stage_memory
from r1mega.models.params import ModelParams, count_params, flops_per_token
from r1mega.parallel.layout import Layout


@dataclass(frozen=True)
class Hardware:
    """One accelerator's limits (dense bf16 peak and HBM), from the vendors' data sheets."""

    name: str
    memory_gib: float
    bf16_flops: float
    """Dense bf16 peak, FLOP/s."""
    hbm_bytes_per_s: float


HARDWARE = {
    "h100": Hardware("H100 SXM 80 GB", 80, 989e12, 3.35e12),
    "h200": Hardware("H200 141 GB", 141, 989e12, 4.8e12),
}
"""Accelerators ``r1mega-check --gpu`` knows."""


@dataclass(frozen=True)
class RLMemory:
    """Bytes on one rank of a pipeline stage during a GRPO step."""

    model_state: MemoryEstimate
    reference: int
    """The frozen reference weights (0 without the KL term)."""
    kv_cache: int
    """The rollout's KV cache at full length."""
    activations: int
    """What the update keeps for backward (1F1B micro-batches in flight on this stage)."""
    distributed: bool
    """Whether the model state uses the distributed optimizer's sharded optimizer bytes."""

    @property
    def state(self) -> int:
        e = self.model_state
        return e.total_distributed if self.distributed else e.total

    @property
    def total(self) -> int:
        """Peak of the step: model state and reference throughout, plus the larger of rollout and update."""
        return self.state + self.reference + max(self.kv_cache, self.activations)


@dataclass(frozen=True)
class RLTime:
    """Seconds of one GRPO step at the hardware's floor."""

    rollout_pipelined: float
    """Rollout with ``row_groups`` row groups in flight."""
    row_groups: int
    """``grpo.rollout_row_groups``, or ``PP`` (the engine's default)."""
    rollout_one_group: float
    """Rollout with one row group (the pipeline idle but for one stage at a time)."""
    update: float
    """Forward-backward of every update of the step, plus the reference forward."""
    bound: str
    """What limits a decode pass: "bandwidth" or "compute"."""
    rollout_refit: float
    """Rollout after a refit into a generation layout without PP: attention TP ``refit_tp`` x experts over all
    ranks, every row stepping at once (the "refit" of NeMo-RL and verl's hybrid engine)."""
    refit_bytes: int
    """Per rank: the generation layout's copy of the weights (its share of every parameter, bf16)."""
    refit_kv: int
    """Per rank: the generation layout's KV cache (its attention-DP group's sequences, every layer)."""
    refit_tp: int


def sequences_per_replica(cfg: R1Config, lay: Layout) -> int:
    """Rollout sequences one data-parallel replica generates per step."""
    g = cfg.grpo
    return -(-g.prompts_per_step * g.group_size // lay.dp)


def kv_values_per_token_layer(cfg: R1Config, tp: int) -> int:
    """Cached values per token and layer on one rank."""
    m = cfg.model
    if m.multi_latent_attention:
        return m.kv_lora_rank + m.qk_pos_emb_head_dim
    head_dim = m.kv_channels or m.hidden_size // m.num_attention_heads
    return 2 * max((m.num_query_groups or m.num_attention_heads) // tp, 1) * head_dim


def rl_memory(cfg: R1Config, lay: Layout, prompt_tokens: int, params: ModelParams | None = None) -> list[RLMemory]:
    """Per pipeline stage: the bytes one rank holds during a GRPO step."""
    m, p, g = cfg.model, cfg.parallel, cfg.grpo
    params = params or count_params(m)
    act_bytes = 2 if cfg.precision.dtype == "bf16" else 4
    seq = prompt_tokens + g.max_new_tokens
    tokens = sequences_per_replica(cfg, lay) * seq
    mbs = cfg.optim.micro_batch_size
    microbatches = max(g.prompts_per_step * g.group_size // (lay.dp * mbs * g.mini_batches), 1)
    per_token_full = act_bytes * 17 * m.hidden_size // max(lay.tp, 1)  # 34 h / TP bytes at 2 bytes per value
    out = []
    for s, estimate in enumerate(stage_memory(cfg, lay, params)):
        layers = len(estimate.params.layers) + (m.mtp_num_layers if estimate.params.output else 0)
        kv = tokens * layers * kv_values_per_token_layer(cfg, lay.tp) * act_bytes
        in_flight = min(lay.pp - s, microbatches)
        micro_tokens = mbs * seq // max(lay.cp, 1)
        if p.recompute_granularity == "full":  # layer inputs of every micro-batch in flight; one layer recomputed
            activations = in_flight * micro_tokens * layers * act_bytes * m.hidden_size + micro_tokens * per_token_full
        else:
            activations = in_flight * micro_tokens * layers * per_token_full
        reference = estimate.params.total * act_bytes if g.loss.kl_coef > 0 else 0
        out.append(RLMemory(estimate, reference, kv, activations, p.use_distributed_optimizer))
    return out


def rl_time(cfg: R1Config, lay: Layout, prompt_tokens: int, hw: Hardware, mfu: float, refit_tp: int = 8) -> RLTime:
    """The GRPO step's rollout and update time at the hardware's floor (see the module docstring)."""
    m, g, p = cfg.model, cfg.grpo, cfg.parallel
    params = count_params(m)
    memory = rl_memory(cfg, lay, prompt_tokens, params)
    weight_bytes = max(r.model_state.weights for r in memory)  # the slowest stage sets the pace
    kv_full = max(r.kv_cache for r in memory)
    rows = sequences_per_replica(cfg, lay)
    context = prompt_tokens + g.max_new_tokens / 2  # mean context over the response
    f = flops_per_token(m, int(2 * context))  # causal mean at 2c = attention over c keys
    stage_flops_per_row = (f.matmul + f.attention) / lay.pp / max(lay.tp * lay.cp, 1)
    kv_mean = kv_full * context / (prompt_tokens + g.max_new_tokens)

    def token_time(groups: int) -> tuple[float, str]:
        read = (weight_bytes + kv_mean / groups) / hw.hbm_bytes_per_s
        compute = stage_flops_per_row * rows / groups / hw.bf16_flops
        return max(read, compute), "bandwidth" if read >= compute else "compute"

    groups = g.rollout_row_groups or lay.pp  # the engine's default: one per stage
    pass_pipelined, bound = token_time(groups)
    pass_single, _ = token_time(1)
    # Refit: every rank holds 1/world of the routed experts and 1/refit_tp of the rest; all rows step together.
    refit_tp = min(refit_tp, lay.world_size)
    dense = params.total - params.experts + sum(layer.tp_sharded + layer.replicated for layer in params.mtp_layers)
    refit_bytes = 2 * (params.experts // lay.world_size + dense // refit_tp)
    attention_dp = lay.world_size // refit_tp
    all_rows = g.prompts_per_step * g.group_size
    rows_per_group = -(-all_rows // attention_dp)
    refit_kv = (
        rows_per_group * (prompt_tokens + g.max_new_tokens) * m.num_layers * kv_values_per_token_layer(cfg, 1) * 2
    )
    refit_read = (refit_bytes + refit_kv * context / (prompt_tokens + g.max_new_tokens)) / hw.hbm_bytes_per_s
    refit_compute = (f.matmul + f.attention) * all_rows / lay.world_size / hw.bf16_flops
    rollout_refit = g.max_new_tokens * max(refit_read, refit_compute)
    tokens_step = g.prompts_per_step * g.group_size * (prompt_tokens + g.max_new_tokens)  # responses at full length
    train = (4 if p.recompute_granularity == "full" else 3) * g.ppo_epochs
    reference = 1 if g.loss.kl_coef > 0 else 0
    update_flops = (train + reference) * (f.forward) * tokens_step
    return RLTime(
        rollout_pipelined=g.max_new_tokens * max(groups, lay.pp) * pass_pipelined,  # stages idle when G < PP
        row_groups=groups,
        rollout_one_group=g.max_new_tokens * lay.pp * pass_single,
        update=update_flops / (lay.world_size * hw.bf16_flops * mfu),
        bound=bound,
        rollout_refit=rollout_refit,
        refit_bytes=refit_bytes,
        refit_kv=refit_kv,
        refit_tp=refit_tp,
    )
