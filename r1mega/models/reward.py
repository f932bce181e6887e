"""The reward model: the r1mega model (any family) with a scalar value head instead of the language-model head.

``RewardModel`` is megatron-core's ``GPTModel`` built by ``r1mega.models.builder`` (the family's layer spec,
embeddings, RoPE or MLA, dense or MoE layers, pipeline stages) with its last step replaced:
``GPTModel.forward`` runs ``_preprocess`` (embeddings, rotary tables), the decoder (with the final norm on the
last stage) and ``_postprocess`` (MTP, output layer, loss); the reward model overrides ``_postprocess`` to
apply a ``ValueHead`` (hidden -> 1) to every token's final-norm output and return ``(b, s)`` values. The loss
and the scorer read the value at each sequence's last real token (the end-of-turn token). megatron-core
0.16.1 has no public switch for "hidden states out" on the last stage; ``_postprocess`` is the narrowest hook
and keeps everything else (non-last pipeline stages still return hidden states). The backbone keeps the
policy's checkpoint keys, so an SFT checkpoint initialises it (``load_reward_weights``); the output layer is
built by ``GPTModel.__init__`` and dropped at once, and the reward model has no MTP block.

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

import dataclasses
import json
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from r1mega.checkpoint.manager import CheckpointError
from r1mega.checkpoint.weights import sharded_model_state, unwrap
from r1mega.config.errors import ConfigError
from r1mega.config.schema import ModelConfig, R1Config
from r1mega.data.preferences import pad_rows, response_ids
from r1mega.models.builder import build_model, transformer_config
from r1mega.utils.logging import get_logger

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

    from r1mega.rewards.registry import RewardInput

log = get_logger(__name__)

HEAD_PREFIX = "value_head."
"""Checkpoint keys of the value head start with this; every other key is the policy's."""


class RewardModelError(CheckpointError):
    """A reward-model checkpoint that cannot be used: says which and why (``r1mega-train`` prints it in one line)."""


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


def load_reward_weights(chunks: Sequence[torch.nn.Module], directory: str, require_head: bool = False) -> bool:
    """Load a checkpoint into reward-model chunks (collective); returns whether it held a value head.

    A reward-model checkpoint loads whole. A policy checkpoint (SFT, GRPO: no value head) loads the backbone,
    and the head keeps its initialisation; ``require_head`` refuses such a checkpoint instead.
    """
    saved = dist_checkpointing.load_tensors_metadata(directory)
    has_head = f"{HEAD_PREFIX}weight" in saved
    if require_head and not has_head:
        raise RewardModelError(
            f"{directory} holds no value head: it is not a reward-model checkpoint (train one with stage=reward_model)."
        )
    state = sharded_model_state(list(chunks))
    if not has_head:
        state = {name: {k: v for k, v in sd.items() if not k.startswith(HEAD_PREFIX)} for name, sd in state.items()}
    loaded = dist_checkpointing.load(state, directory)
    for i, chunk in enumerate(chunks):
        missing, unexpected = unwrap(chunk).load_state_dict(loaded[f"model{i}"], strict=False)
        missing = [k for k in missing if has_head or not k.startswith(HEAD_PREFIX)]
        if missing or unexpected:
            raise RewardModelError(
                f"{directory} does not fit the reward model: missing {missing}, unexpected {unexpected}."
            )
    if not has_head:
        log.info("reward model: backbone from %s (a policy checkpoint); the value head starts fresh", directory)
    return has_head


def resolve_checkpoint(path: str) -> Path:
    """A checkpoint folder (``step_*`` with ``meta.json``), or the one a checkpoints folder's ``latest`` names."""
    p = Path(path)
    if (p / "meta.json").is_file():
        return p
    if (p / "latest").is_file() and (p / (p / "latest").read_text().strip() / "meta.json").is_file():
        return p / (p / "latest").read_text().strip()
    raise RewardModelError(
        f"No r1mega checkpoint at {path!r}: give a step_* folder with meta.json, or a checkpoints folder with 'latest'."
    )


class RewardModelScorer:
    """A trained reward model in the trainer process: raw scores of ``RewardInput`` rollouts.

    A rollout is scored as the conversation ``[user: prompt, assistant: prefix + completion]`` through
    ``r1mega.data.preferences.response_ids``, the rendering the model was trained on. Every model-parallel
    rank of a data-parallel replica must call ``score`` with the same samples (they do in GRPO); under
    expert parallelism all ranks must call it equally often (each call makes ``ceil(n / batch_size)``
    forwards).
    """

    def __init__(
        self,
        chunks: list[RewardModel],
        tokenizer: PreTrainedTokenizerFast,
        prefix: str = "",
        batch_size: int = 8,
        max_length: int | None = None,
        multiple_of: int = 1,
    ) -> None:
        if len(chunks) != 1:
            raise ConfigError(
                "parallel.pipeline_model_parallel_size", len(chunks), "1 to score with a reward model in-process"
            )
        self.model = chunks[0].eval().requires_grad_(False)
        self.tokenizer, self.prefix, self.batch_size = tokenizer, prefix, batch_size
        self.max_length = max_length or self.model.max_sequence_length
        self.multiple_of = multiple_of
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @classmethod
    def from_checkpoint(cls, cfg: R1Config, tokenizer: PreTrainedTokenizerFast) -> RewardModelScorer:
        """Build the reward model of ``cfg.reward.reward_model_path`` in this run's layout and load it.

        The architecture is the checkpoint's own (``meta.json`` records the run's config); the parallel
        layout and precision are this run's. Responses start after ``grpo.prefix`` when it is in the prompt.
        """
        r = cfg.reward
        path = resolve_checkpoint(r.reward_model_path)
        saved = json.loads((path / "meta.json").read_text())["config"]
        try:
            model = ModelConfig(**saved["model"])
        except TypeError as e:
            raise RewardModelError(f"{path}/meta.json: its model config does not fit this version ({e}).") from None
        if model.is_moe and cfg.parallel.expert_model_parallel_size > 1 and cfg.grpo.dynamic_sampling:
            raise ConfigError(
                "grpo.dynamic_sampling",
                True,
                "false with a mixture-of-experts reward model under expert parallelism (its forwards are collective "
                "over EP ranks, and dynamic sampling has ranks score different numbers of groups)",
            )
        if saved.get("data", {}).get("tokenizer") not in (None, cfg.data.tokenizer):
            log.warning(
                "reward model %s was trained with tokenizer %s; scoring with %s",
                path,
                saved["data"]["tokenizer"],
                cfg.data.tokenizer,
            )
        chunks = build_reward_model(dataclasses.replace(cfg, model=model))
        load_reward_weights(chunks, str(path), require_head=True)
        log.info("reward model %s (%s) loaded for the reward_model reward", path, model.name)
        tp = cfg.parallel.tensor_model_parallel_size if cfg.parallel.sequence_parallel else 1
        return cls(chunks, tokenizer, cfg.grpo.prefix, r.reward_model_batch_size, multiple_of=tp)

    def token_ids(self, sample: RewardInput) -> list[int]:
        """The tokens the model scores for ``sample`` (the most recent ``max_length`` if longer)."""
        response = (self.prefix if sample.prefix_in_prompt else "") + sample.completion
        return response_ids(self.tokenizer, sample.prompt, response)[-self.max_length :]

    @torch.no_grad()
    def score(self, samples: Sequence[RewardInput]) -> list[float]:
        """Raw reward of each sample (the value at its last token)."""
        rows = [self.token_ids(s) for s in samples]
        device = next(self.model.parameters()).device
        out: list[float] = []
        for i in range(0, len(rows), self.batch_size):
            batch = {
                k: v.to(device)
                for k, v in pad_rows(rows[i : i + self.batch_size], self.pad_id, self.multiple_of).items()
            }
            values = self.model(batch["tokens"], batch["position_ids"], None)  # (b, s)
            out += values[torch.arange(len(values), device=device), batch["last"]].tolist()
        return out
