"""The trained reward model in the trainer process: raw scores of rollouts for the ``reward_model`` reward.

Imports torch and megatron-core, so only ``r1mega.rewards.reward_model.attach_reward_model`` imports it (the
verifier workers import the rest of ``r1mega.rewards`` and stay free of torch).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from r1mega.checkpoint.reward import RewardModelError, load_reward_weights, resolve_checkpoint
from r1mega.config.errors import ConfigError
from r1mega.config.schema import ModelConfig, R1Config
from r1mega.data.preferences import pad_rows, response_ids
from r1mega.models.reward import RewardModel, build_reward_model
from r1mega.rewards.registry import RewardInput
from r1mega.train.step import pipeline_forward_values
from r1mega.utils.logging import get_logger

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

log = get_logger(__name__)


class RewardModelScorer:
    """A trained reward model in the trainer process: raw scores of ``RewardInput`` rollouts.

    A rollout is scored as the conversation ``[user: prompt, assistant: prefix + completion]`` through
    ``r1mega.data.preferences.response_ids``, the rendering the model was trained on. Every model-parallel
    rank of a data-parallel replica must call ``score`` with the same samples (they do in GRPO); under
    expert parallelism all ranks must call it equally often (each call makes ``ceil(n / batch_size)``
    forwards).

    Under pipeline parallelism (``pipeline``: the run's config, whose schedule runs the chunks) the scores go
    through megatron's forward-only pipeline schedule, every micro-batch ``batch_size`` rows of one width (stages
    exchange fixed shapes), and the last stage broadcasts them to its pipeline group, so every stage returns them.
    """

    def __init__(
        self,
        chunks: list[RewardModel],
        tokenizer: PreTrainedTokenizerFast,
        prefix: str = "",
        batch_size: int = 8,
        max_length: int | None = None,
        multiple_of: int = 1,
        pipeline: R1Config | None = None,
    ) -> None:
        if len(chunks) != 1:
            raise ConfigError(
                "parallel.virtual_pipeline_model_parallel_size",
                len(chunks),
                "null to score with a reward model in-process (one model chunk per rank)",
            )
        self.model = chunks[0].eval().requires_grad_(False)
        self.pp_group = self.model.pg_collection.pp
        self.pipeline = pipeline if self.pp_group.size() > 1 else None
        if self.pp_group.size() > 1 and pipeline is None:
            raise ValueError("a reward model split into pipeline stages needs the run's config (pipeline=cfg)")
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
        return cls(chunks, tokenizer, cfg.grpo.prefix, r.reward_model_batch_size, multiple_of=tp, pipeline=cfg)

    def token_ids(self, sample: RewardInput) -> list[int]:
        """The tokens the model scores for ``sample`` (the most recent ``max_length`` if longer)."""
        response = (self.prefix if sample.prefix_in_prompt else "") + sample.completion
        return response_ids(self.tokenizer, sample.prompt, response)[-self.max_length :]

    @torch.no_grad()
    def score(self, samples: Sequence[RewardInput]) -> list[float]:
        """Raw reward of each sample (the value at its last token)."""
        rows = [self.token_ids(s) for s in samples]
        if self.pipeline is not None:
            return self._score_pipelined(rows)
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

    def _score_pipelined(self, rows: list[list[int]]) -> list[float]:
        """``score`` through the forward-only pipeline schedule; the last stage's values, broadcast."""
        width = -(-max(map(len, rows)) // self.multiple_of) * self.multiple_of  # one width for every micro-batch
        size = self.batch_size
        chunks = [rows[i : i + size] for i in range(0, len(rows), size)]
        batches = [pad_rows(c + [[self.pad_id]] * (size - len(c)), self.pad_id, width) for c in chunks]
        flat = pipeline_forward_values(
            self.pipeline, [self.model], iter(batches),
            lambda model, b: model(b["tokens"], b["position_ids"], None),  # (b, s) values on the last stage
            lambda b, out: out[torch.arange(len(out), device=out.device), b["last"]],
            len(batches), len(batches) * size, width, size,
        )  # fmt: skip
        return flat[: len(rows)].tolist()
