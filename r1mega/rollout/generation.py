"""What the offline generation jobs share (rejection sampling, distillation traces, ``r1mega-eval``).

A job loads the policy from ``checkpoint.load`` (any layout it was saved in), builds a rollout engine on it,
gives each data-parallel rank its share of the prompts, generates in batches, and gathers the results on
rank 0, which writes them. Tensor-parallel peers and the stages of a pipeline run the same prompts (the engine
keeps them in step and broadcasts the last stage's tokens); only tensor-parallel rank 0 of the first pipeline
stage of each replica hands results on. Under expert parallelism every rank makes the same number of
generation calls, a rank out of prompts serving its peers' MoE exchanges with a throw-away row, because MoE
layers exchange tokens in every forward.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from tqdm import tqdm

from r1mega.checkpoint.manager import CheckpointError
from r1mega.checkpoint.weights import load_weights
from r1mega.config.errors import ConfigError
from r1mega.config.schema import R1Config
from r1mega.data.tokenizer import THINK_END, THINK_START, load_model_tokenizer, pad_token_id
from r1mega.models.builder import build_model
from r1mega.parallel.bootstrap import ParallelContext
from r1mega.rollout import RolloutEngine, SamplingParams
from r1mega.utils.logging import get_logger

log = get_logger(__name__)

T = TypeVar("T")

_SHAPE_FIELDS = ("family", "num_layers", "hidden_size", "num_attention_heads", "vocab_size", "num_experts")
"""Model fields that must match the checkpoint's for its weights to load."""


def resolve_checkpoint(path: str) -> Path:
    """The weights folder ``path`` names: a step folder or an imported checkpoint as is, a run's
    ``checkpoints/`` folder (its ``latest``) or a run folder (``checkpoints/latest``)."""
    p = Path(path)
    for candidate in (p, p / "checkpoints"):
        if (candidate / "latest").is_file():
            return candidate / (candidate / "latest").read_text().strip()
        steps = sorted(candidate.glob("step_*/meta.json"), key=lambda m: int(m.parent.name.split("_")[1]))
        if steps:
            return steps[-1].parent
    if not (p / ".metadata").is_file():
        raise CheckpointError(
            f"{path} holds no checkpoint: give checkpoint.load a step_N folder, a run's checkpoints/ folder, "
            "a run folder or a folder written by r1mega-convert import."
        )
    return p


def check_checkpoint_model(path: Path, cfg: R1Config) -> None:
    """Fail with the fix when a training checkpoint's ``meta.json`` records another model than ``cfg.model``."""
    meta = path / "meta.json"
    if not meta.is_file():
        return
    saved = json.loads(meta.read_text()).get("config", {}).get("model", {})
    differ = [k for k in _SHAPE_FIELDS if k in saved and saved[k] != getattr(cfg.model, k)]
    if differ:
        diffs = ", ".join(f"{k}={saved[k]!r}" for k in differ)
        raise ConfigError(
            "model", cfg.model.name, f"the model {path} was saved with ({diffs}): pass model={saved.get('name')}"
        )


def load_policy(cfg: R1Config, path: Path) -> list[torch.nn.Module]:
    """This rank's model chunks with the weights saved in ``path`` (collective), in eval mode."""
    check_checkpoint_model(path, cfg)
    chunks = build_model(cfg)
    load_weights(chunks, str(path))
    log.info("loaded %s weights from %s", cfg.model.name, path)
    for chunk in chunks:
        chunk.eval().requires_grad_(False)
    return chunks


class GenerationJob:
    """The policy, its tokenizer and rollout engine, and this rank's place among the data-parallel ranks."""

    def __init__(self, cfg: R1Config, ctx: ParallelContext) -> None:
        if not cfg.checkpoint.load:
            raise ConfigError("checkpoint.load", None, "the checkpoint folder to generate with")
        self.checkpoint = resolve_checkpoint(cfg.checkpoint.load)
        if not cfg.data.tokenizer:
            raise ConfigError("data.tokenizer", None, "the tokenizer directory of the checkpoint's model")
        self.cfg, self.ctx = cfg, ctx
        self.tokenizer = load_model_tokenizer(cfg.data.tokenizer, cfg.model.vocab_size)
        self.chunks = load_policy(cfg, self.checkpoint)
        self.dp, self.dp_rank, self.dp_group = ctx.data_parallel_size, ctx.dp_rank, ctx.groups.dp
        self.reports = ctx.tp_rank == 0 and dist.get_rank(ctx.groups.pp) == 0
        """Whether this rank's results are used (tensor-parallel peers and the other pipeline stages generate the
        same ones: the engine broadcasts the last stage's tokens)."""
        self.engine = RolloutEngine(
            self.chunks,
            self.tokenizer,
            vocab_size=len(self.tokenizer),
            seed=cfg.data.seed + 7919 * self.dp_rank,
            pad_token_id=pad_token_id(self.tokenizer),
            groups=ctx.groups,
            max_batch=cfg.grpo.rollout_batch,
            row_groups=cfg.grpo.rollout_row_groups,
            compiled=cfg.grpo.rollout_compile,
        )
        self.prefix, self.system_prompt = cfg.grpo.prefix, cfg.grpo.system_prompt
        self.forbidden = tuple(t for t in self.tokenizer.all_special_tokens if t not in (THINK_START, THINK_END))
        """Special-token strings (BOS, EOS, chat roles, pad) that never belong inside a response's text."""

    def shard(self, items: Sequence[T]) -> list[tuple[int, T]]:
        """This rank's items with their index in ``items`` (round robin over data-parallel ranks)."""
        return [(i, items[i]) for i in range(self.dp_rank, len(items), self.dp)]

    def batches(self, items: Sequence[T], size: int, desc: str) -> Iterator[list[T]]:
        """``items`` in batches of ``size``, in the same number of steps on every rank (collective).

        A rank whose items ran out yields nothing more; under expert parallelism it makes a throw-away
        one-token generation per missing batch so that its peers' MoE exchanges find it.
        """
        count = torch.tensor([-(-len(items) // size)], device=self.ctx.device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        serve_peers = self.ctx.ep_size > 1
        show = self.ctx.is_main and self.cfg.logging.progress_bar
        with tqdm(total=int(count), desc=desc, unit="batch", disable=not show) as bar:
            for k in range(int(count)):
                batch = list(items[k * size : (k + 1) * size])
                if batch:
                    yield batch
                elif serve_peers:
                    self.engine.generate([[self.engine.pad_token_id]], SamplingParams(max_new_tokens=1))
                bar.update()

    def gather(self, obj: T) -> list[T] | None:
        """``obj`` of every data-parallel rank in rank order on global rank 0; None on other ranks."""
        if not self.reports:
            return None
        dst = dist.get_global_rank(self.dp_group, 0)
        out: list[Any] | None = [None] * self.dp if dist.get_rank() == dst else None
        dist.gather_object(obj, out, dst=dst, group=self.dp_group)
        return out if self.ctx.is_main else None

    @staticmethod
    def broadcast(obj: T) -> T:
        """Rank 0's ``obj`` on every rank (collective)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
