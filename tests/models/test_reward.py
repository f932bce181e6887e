"""The reward model on real megatron-core: a value head instead of the LM head for every family, scores that
padding does not change, a policy checkpoint initialising the backbone, and TP=2 (with and without sequence
parallelism) over gloo giving the values and gradients of one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dist_utils import run_ranks

from r1mega.checkpoint.reward import RewardModelError, load_reward_weights
from r1mega.checkpoint.weights import map_parameters, save_weights
from r1mega.config.load import compose_config
from r1mega.data.preferences import pad_rows
from r1mega.models.builder import build_model
from r1mega.models.reward import RewardModel, build_reward_model
from r1mega.parallel.bootstrap import single_process

WORKER = Path(__file__).parent / "reward_tp_worker.py"


@pytest.mark.parametrize("model", ["qwen2_tiny", "dsv3_tiny", "llama_tiny"])
def test_value_head_replaces_the_lm_head_and_ignores_padding(model: str) -> None:
    cfg = compose_config([f"model={model}", "data.seq_length=32"])
    with single_process(cfg):
        (rm,) = build_reward_model(cfg)  # dsv3_tiny has an MTP layer: the reward model drops it
        assert isinstance(rm, RewardModel) and not hasattr(rm, "output_layer") and not hasattr(rm, "mtp")
        keys = set(rm.sharded_state_dict())
        assert {"value_head.weight", "value_head.bias", "decoder.final_layernorm.weight"} <= keys
        assert not [k for k in keys if k.startswith(("output_layer", "mtp"))]
        rm.eval()
        g = torch.Generator().manual_seed(0)
        short, long = (
            torch.randint(10, 2000, (9,), generator=g).tolist(),
            torch.randint(10, 2000, (23,), generator=g).tolist(),
        )
        with torch.no_grad():
            batch = pad_rows([short, long], pad_id=2)
            values = rm(batch["tokens"], batch["position_ids"], None)  # (b, s)
            alone = pad_rows([short], pad_id=2)
            alone_values = rm(alone["tokens"], alone["position_ids"], None)
    assert values.shape == (2, 23) and values.dtype == torch.float32
    torch.testing.assert_close(values[0, :9], alone_values[0], rtol=1e-5, atol=1e-5)  # right padding is invisible


def test_backbone_loads_from_a_policy_checkpoint(tmp_path: Path) -> None:
    cfg = compose_config(["model=qwen2_tiny"])
    with single_process(cfg):
        policy = build_model(cfg)
        g = torch.Generator().manual_seed(1)
        map_parameters(policy, lambda name, p: torch.randn(p.shape, generator=g) * 0.05)
        save_weights(policy, str(tmp_path / "policy"))
        rm = build_reward_model(cfg)
        head = rm[0].value_head.weight.detach().clone()
        assert load_reward_weights(rm, str(tmp_path / "policy")) is False
        theirs = dict(policy[0].named_parameters())
        for name, p in rm[0].named_parameters():
            if name.startswith("value_head"):
                continue
            torch.testing.assert_close(p, theirs[name], rtol=0, atol=0)
        assert torch.equal(rm[0].value_head.weight, head)  # the head keeps its initialisation
        with pytest.raises(RewardModelError, match="not a reward-model checkpoint"):
            load_reward_weights(rm, str(tmp_path / "policy"), require_head=True)
        with torch.no_grad():
            rm[0].value_head.weight.mul_(3.0)
        save_weights(rm, str(tmp_path / "rm"))
        fresh = build_reward_model(cfg)
        assert load_reward_weights(fresh, str(tmp_path / "rm"), require_head=True) is True
        torch.testing.assert_close(fresh[0].value_head.weight, rm[0].value_head.weight, rtol=0, atol=0)


@pytest.mark.slow
def test_tensor_parallel_matches_one_process(tmp_path: Path) -> None:
    """Values, loss and gradients (value head and a backbone weight, after finalize_model_grads) under TP=2,
    with and without sequence parallelism, equal one process's."""
    single = json.loads(run_ranks(str(WORKER), ["1"], world_size=1)[0].strip().splitlines()[-1])
    outs = run_ranks(str(WORKER), ["2"], world_size=2)
    for out in outs:
        tp = json.loads(out.strip().splitlines()[-1])
        for sp in ("false", "true"):
            for key in ("values", "loss", "head_grad", "bias_grad", "norm_grad"):
                torch.testing.assert_close(
                    torch.tensor(tp[sp][key]), torch.tensor(single["false"][key]), rtol=1e-4, atol=1e-5
                )
