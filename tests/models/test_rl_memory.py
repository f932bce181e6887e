"""The GRPO step's memory and time estimate (``r1mega.models.rl_memory``) against hand-computed values."""

from __future__ import annotations

import pytest

from r1mega.config.load import compose_config
from r1mega.models.rl_memory import HARDWARE, kv_values_per_token_layer, rl_memory, rl_time, sequences_per_replica
from r1mega.parallel.layout import layout

GRPO = ["stage=grpo", "data=cold_start", "grpo.prompts_per_step=8", "grpo.group_size=8", "grpo.max_new_tokens=256"]


def _setup(*overrides: str, world: int = 1):
    cfg = compose_config([*GRPO, *overrides])
    return cfg, layout(cfg, world)


def test_mla_kv_cache_is_the_latent_of_every_layer_the_stage_holds() -> None:
    cfg, lay = _setup()
    assert kv_values_per_token_layer(cfg, 1) == 32 + 8  # dsv3_tiny: kv_lora_rank + qk_pos_emb_head_dim
    (r,) = rl_memory(cfg, lay, prompt_tokens=512)
    tokens = 64 * (512 + 256)  # 8 prompts x 8 samples on one replica, prompt + response
    assert r.kv_cache == tokens * (4 + 1) * 40 * 4  # 4 layers + 1 MTP layer, fp32


def test_gqa_kv_cache_splits_its_groups_over_tensor_parallel_ranks() -> None:
    cfg, _ = _setup("model=qwen2_tiny", "parallel=tp2")
    m = cfg.model
    head_dim = m.hidden_size // m.num_attention_heads
    assert kv_values_per_token_layer(cfg, 2) == 2 * (m.num_query_groups // 2) * head_dim


def test_reference_only_with_kl_and_recompute_shrinks_activations() -> None:
    cfg, lay = _setup("grpo.loss.kl_coef=0.1")
    (with_kl,) = rl_memory(cfg, lay, 512)
    assert with_kl.reference == with_kl.model_state.weights
    cfg, lay = _setup("grpo.loss.kl_coef=0")
    (no_kl,) = rl_memory(cfg, lay, 512)
    assert no_kl.reference == 0
    cfg, lay = _setup(
        "parallel.recompute_granularity=full", "parallel.recompute_method=uniform", "parallel.recompute_num_layers=1"
    )
    (full,) = rl_memory(cfg, lay, 512)
    assert full.activations < no_kl.activations
    assert full.total == full.state + full.reference + max(full.kv_cache, full.activations)


def test_sequences_are_split_over_data_parallel_replicas() -> None:
    cfg, lay = _setup("parallel=ep2", world=2)
    assert sequences_per_replica(cfg, lay) == 32


@pytest.mark.parametrize("gpu", sorted(HARDWARE))
def test_decode_floor_and_row_groups_in_flight(gpu: str) -> None:
    hw = HARDWARE[gpu]
    cfg, lay = _setup()
    t = rl_time(cfg, lay, 512, hw, mfu=0.4)
    assert t.bound == "bandwidth"  # a tiny model's weights and cache, 64 rows: reading dominates
    assert t.rollout_pipelined == pytest.approx(t.rollout_one_group)  # one stage: nothing to overlap
    assert t.update > 0 and t.rollout_refit > 0

    # DeepSeek-V3 over 16 stages, 32K-token responses, many rows: the KV cache, not the weights, is what each pass
    # reads, and it splits over the row groups in flight, which then pay off almost PP-fold.
    dsv3 = ["model=deepseek_v3", "stage=grpo", "parallel=dsv3_grpo_256", "grpo.prompts_per_step=32768"]
    cfg = compose_config(dsv3)
    lay = layout(cfg, 256)
    t = rl_time(cfg, lay, 512, hw, mfu=0.4)
    assert t.rollout_pipelined < t.rollout_one_group / 8 and t.row_groups == 16  # one per stage by default
    # grpo.rollout_row_groups: one group is the one-group loop; four leave 12 of every 16 stage slots idle.
    one = rl_time(compose_config([*dsv3, "grpo.rollout_row_groups=1"]), lay, 512, hw, mfu=0.4)
    assert one.rollout_pipelined == pytest.approx(t.rollout_one_group) and one.row_groups == 1
    four = rl_time(compose_config([*dsv3, "grpo.rollout_row_groups=4"]), lay, 512, hw, mfu=0.4)
    assert t.rollout_pipelined < four.rollout_pipelined < one.rollout_pipelined
