"""The reward model: the r1mega model (any family) with a scalar value head instead of the language-model head.

``RewardModel`` is megatron-core's ``GPTModel`` built by ``r1mega.models.builder`` (the family's layer spec,
embeddings, RoPE or MLA, dense or MoE layers, pipeline stages) with its last step replaced:
``GPTModel.forward`` runs ``_preprocess`` (embeddings, rotary tables), the decoder (with the final norm on the
last stage) and ``_postprocess`` (MTP, output layer, loss); the reward model overrides ``_postprocess`` to
apply a ``ValueHead`` (hidden -> 1) to every token's final-norm output and return ``(b, s)`` values. The loss
and the scorer read the value at each sequence's last real token (the end-of-turn token). megatron-core
0.16.1 has no public switch for "hidden states out" on the last stage; ``_postprocess`` is the narrowest hook
and keeps everything else (non-last pipeline stages still return hidden states). The backbone keeps the
policy's checkpoint keys, so an SFT checkpoint initialises it (``r1mega.checkpoint.reward``, which loads
reward-model checkpoints); the output layer is built by ``GPTModel.__init__`` and dropped at once, and the
reward model has no MTP block. Scoring rollouts with a trained one is ``r1mega.rewards.reward_model_scorer``.

Tensor parallelism: the head is a plain ``(h,)`` weight and a bias, replicated on every TP rank (a width-1
output cannot be split) and initialised from a fixed seed so replicas agree. Without sequence parallelism
the decoder output is replicated over TP: every rank computes the same values and the same head gradient,
and the gradient into the hidden states is the full one on each rank, as a replicated region expects, so
nothing needs reducing. With sequence parallelism a rank holds a sequence shard: the head runs on the shard
and the per-token values ``(s/tp, b, 1)`` (not the hidden states) are all-gathered, with a backward that
*splits* the identical full gradient (``tensor_parallel_output_grad=False``) rather than summing TP copies;
each rank's head gradient then covers its shard only, so the head parameters are marked
``sequence_parallel`` and ``finalize_model_grads`` sums them over TP, as megatron does for norm weights.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from r1mega.config.errors import ConfigError
from r1mega.config.schema import R1Config
from r1mega.models.builder import build_model, transformer_config

HEAD_PREFIX = "value_head."
"""Checkpoint keys of the value head start with this; every other key is the policy's."""


class ValueHead(MegatronModule):
    """``values = hidden @ weight + bias`` for every token, replicated on every TP rank (see the module docstring)."""

    def __init__(self, config: TransformerConfig, seed: int) -> None:
        super().__init__(config)
        g = torch.Generator().manual_seed(seed)  # the same on every rank: TP replicas start equal
        std = 1.0 / (config.hidden_size + 1) ** 0.5
        weight = torch.randn(config.hidden_size, generator=g) * std
        self.weight = torch.nn.Parameter(weight.to(config.params_dtype))  # (h,)
        self.bias = torch.nn.Parameter(torch.zeros(1, dtype=config.params_dtype))  # (1,)
        for p in (self.weight, self.bias):  # grads of a sequence shard: summed over TP by finalize_model_grads
            p.sequence_parallel = config.sequence_parallel

    def forward(self, hidden: Tensor) -> Tensor:
        """``(s, b, h)`` final-norm hidden states (``s/tp`` rows under sequence parallelism) -> ``(b, s)`` values."""
        values = (hidden @ self.weight + self.bias)[..., None]  # (s/tp, b, 1)
        if self.config.sequence_parallel:
            values = gather_from_sequence_parallel_region(values, tensor_parallel_output_grad=False)  # (s, b, 1)
        return values[..., 0].transpose(0, 1).float()  # (b, s)


class RewardModel(GPTModel):
    """``GPTModel`` whose last pipeline stage outputs a scalar per token (``(b, s)``) instead of logits."""

    def __init__(self, *args: Any, head_seed: int = 0, **kwargs: Any) -> None:
        config: TransformerConfig = kwargs["config"]
        if config.mtp_num_layers:
            raise ConfigError(
                "model.mtp_num_layers", config.mtp_num_layers, "off in a reward model's TransformerConfig"
            )
        kwargs.update(share_embeddings_and_output_weights=False, mtp_block_spec=None)
        super().__init__(*args, **kwargs)
        if self.post_process:
            del self.output_layer  # no language-model head (GPTModel builds it unconditionally)
            self.value_head = ValueHead(self.config, head_seed)

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> ShardedStateDict:
        """Every module's tensors (``GPTModel``'s version ties or pads an output layer, which is gone)."""
        return MegatronModule.sharded_state_dict(self, prefix, sharded_offsets, metadata)

    def _postprocess(self, hidden_states: Tensor, **_: Any) -> Tensor:
        """Values of every token on the last stage; hidden states elsewhere (the next stage's input)."""
        if not self.post_process:
            return hidden_states
        return self.value_head(hidden_states)  # (b, s)


def build_reward_model(cfg: R1Config, config: TransformerConfig | None = None) -> list[RewardModel]:
    """Reward-model chunks of ``cfg.model`` in this run's layout (needs megatron-core's parallel state).

    Switches multi-token prediction off in ``config`` (the one the trainer wraps the chunks with).
    """
    config = config or transformer_config(cfg)
    config.mtp_num_layers = None  # a reward model predicts no tokens
    return build_model(cfg, config, model_cls=partial(RewardModel, head_seed=cfg.seed))
