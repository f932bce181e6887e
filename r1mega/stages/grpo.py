"""GRPO: reinforcement learning with group-relative advantages and rule-based rewards (DeepSeek-R1).

Each step: take this rank's prompts, sample ``grpo.group_size`` responses per prompt from the current policy
(the rollout engine, on the trainer's own weights), score them (the reward registry), turn rewards into
group-relative advantages, then make ``ppo_epochs * mini_batches`` optimizer updates on that rollout batch
with the sampling-time log-probabilities as the old policy. A frozen reference model (the starting weights)
gives the KL term when ``grpo.loss.kl_coef > 0``; otherwise none is built. All RL maths comes from
``r1mega.rl`` (registered, unit-tested pure functions).

Data-parallel ranks sample their own prompts; losses are normalised over the whole rollout batch (global
token / sequence counts), so the update does not depend on how it is split into micro-batches and ranks.
Micro-batches are padded rows or, with ``grpo.micro_batch_tokens``, responses packed to a token budget
(``r1mega.stages.grpo_data``). With ``grpo.mtp_loss_coef > 0`` the update also trains the model's MTP module
on the policy's own responses (``r1mega.rl.mtp``), so MTP speculative decoding keeps its acceptance.

Under pipeline parallelism every stage of a pipeline holds the same rollout (the engine broadcasts the last
stage's tokens), so every stage builds the same micro-batches and scores the same rewards; the updates and
the log-probabilities of the reference (and old) policy run through megatron's pipeline schedule, with every
micro-batch of a call padded to one width (the stages exchange fixed-shape activations), and the last
stage's log-probabilities are broadcast to its pipeline group.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any, ClassVar

import torch

from r1mega.checkpoint.weights import load_weights
from r1mega.config.errors import ConfigError
from r1mega.config.schema import R1Config, RewardConfig
from r1mega.data.prompts import PromptSampler, load_prompts, render_prompt
from r1mega.data.tokenizer import load_model_tokenizer, pad_token_id
from r1mega.eval.protocol import evaluate_prompts, summarize
from r1mega.models.builder import build_model, unwrap, use_transformer_engine
from r1mega.models.forward import forward_logits, forward_logits_mtp
from r1mega.parallel.bootstrap import ParallelContext
from r1mega.rewards.reward_model import attach_reward_model
from r1mega.rewards.scorer import RewardScorer
from r1mega.rl import compute_advantages, compute_policy_objective, entropy_from_logits, token_logprobs
from r1mega.rl.kl import apply_kl_to_rewards
from r1mega.rl.logits import mask_padded_vocab
from r1mega.rl.mtp import mtp_cross_entropy
from r1mega.rollout import RolloutEngine, SamplingParams
from r1mega.stages.base import Stage
from r1mega.stages.grpo_data import (
    Batch,
    Plan,
    Sample,
    make_batch,
    padded_columns,
    plan_packed,
    plan_padded,
    response_values,
    rollout_metrics,
    round_up,
)
from r1mega.train.step import Trainer, pipeline_forward_values, train_step
from r1mega.utils.device import current_device, to_device
from r1mega.utils.logging import get_logger

log = get_logger(__name__)

SHARE_KEYS = ("loss", "pg_loss", "kl_loss", "entropy")
"""Objective terms already normalised over the whole batch: reported as sums over micro-batches."""
TOKEN_KEYS = ("pg_clipfrac_low", "pg_clipfrac_high", "ppo_kl")
"""Per-token means of each micro-batch: reported weighted by its tokens."""
CORRECTION_KEYS = ("rollout_is_mean", "rollout_is_clipfrac", "rollout_logp_gap")
"""Per-token means reported (like ``TOKEN_KEYS``) when ``grpo.loss.rollout_correction`` is on."""
MTP_KEYS = ("mtp_loss", "mtp_acc")
"""Reported when ``grpo.mtp_loss_coef > 0``: the MTP term (like ``SHARE_KEYS``) and depth-1 top-1 accuracy."""


class GRPOStage(Stage):
    """The GRPO stage: rollout, reward, advantages, policy updates (it runs its own step)."""

    report_keys: ClassVar[Sequence[str]] = (*SHARE_KEYS, *TOKEN_KEYS)

    def __init__(self, cfg: R1Config, ctx: ParallelContext) -> None:
        super().__init__(cfg, ctx)
        g, d = cfg.grpo, cfg.data
        if not (d.train_path and d.tokenizer):
            raise ConfigError("data.train_path", d.train_path, "a prompt JSONL and data.tokenizer for stage=grpo")
        self.g = g
        self.dp, self.dp_rank, self.dp_group = ctx.data_parallel_size, ctx.dp_rank, ctx.groups.dp
        self.tp = ctx.tp_size
        self.pp = cfg.parallel.pipeline_model_parallel_size
        if g.prompts_per_step % self.dp:
            raise ConfigError(
                "grpo.prompts_per_step", g.prompts_per_step, f"a multiple of the data-parallel size {self.dp}"
            )
        self.local_prompts = g.prompts_per_step // self.dp
        per_update = self.local_prompts * g.group_size // g.mini_batches
        self.budget = g.micro_batch_tokens
        mbs = 1 if self.budget else cfg.optim.micro_batch_size  # a packed micro-batch is one row
        self.mbs = mbs
        if self.budget and use_transformer_engine(cfg):
            raise ConfigError(
                "grpo.micro_batch_tokens",
                self.budget,
                "null with Transformer Engine layers for now (TE's causal kernel ignores the per-response mask; "
                "THD packed sequences are not wired yet)",
            )
        if (self.local_prompts * g.group_size) % g.mini_batches or per_update % mbs:
            raise ConfigError(
                "grpo.mini_batches",
                g.mini_batches,
                f"a divisor that leaves a multiple of optim.micro_batch_size={mbs} of the "
                f"{self.local_prompts * g.group_size} responses per rank and step",
            )
        self.mtp_coef = g.mtp_loss_coef
        self._layouts: list[tuple[int, float]] = []  # per update of the running step: micro-batches, padding share
        self._scale = 1.0  # micro-batches x DP of the running update (megatron divides by both; the loss undoes it)
        self.tokenizer = load_model_tokenizer(d.tokenizer, cfg.model.vocab_size)
        self.pad_id = pad_token_id(self.tokenizer)
        self.prompts = load_prompts(d.train_path)
        self.eval_set = load_prompts(d.eval_path) if d.eval_path else []
        if g.eval_prompts:
            self.eval_set = self.eval_set[: g.eval_prompts]
        self.sampler = PromptSampler(len(self.prompts), d.seed, self.dp_rank, self.dp)
        self.shuffle = random.Random(d.seed + 17 * self.dp_rank)
        self.scorer = RewardScorer(cfg.reward)
        attach_reward_model(self.scorer, cfg, self.tokenizer)  # no-op unless reward.weights has reward_model
        eval_weights = {"accuracy": 1.0, "format": 1.0}
        self.eval_scorer = RewardScorer(RewardConfig(**{**vars(cfg.reward), "weights": eval_weights}))
        self.engine: RolloutEngine | None = None
        self.ref: list[torch.nn.Module] | None = None
        self._tokens = 0
        self._normalizers: tuple[float, float] = (1.0, 1.0)

    # ---- set-up -------------------------------------------------------------------------------------

    def bind(self, trainer: Trainer) -> None:
        """Attach to the trainer's model (before any checkpoint is loaded): rollout engine, reference model."""
        chunks = [unwrap(m) for m in trainer.model]
        self.engine = RolloutEngine(
            chunks,
            self.tokenizer,
            vocab_size=len(self.tokenizer),
            seed=self.cfg.data.seed + 7919 * self.dp_rank,
            pad_token_id=self.pad_id,
            groups=self.ctx.groups,
            max_batch=self.g.rollout_batch,
            speculative=self.g.speculative,
            row_groups=self.g.rollout_row_groups,
            compiled=self.g.rollout_compile,
        )
        loss = self.g.loss
        if loss.kl_coef > 0:  # the reference: the starting weights (checkpoint.load, else this initialisation)
            self.ref = build_model(self.cfg)
            with torch.no_grad():
                for ref, live in zip(self.ref, chunks, strict=True):
                    for p, q in zip(ref.parameters(), live.parameters(), strict=True):
                        p.copy_(q)
            if self.cfg.checkpoint.load:
                load_weights(self.ref, self.cfg.checkpoint.load, verify=self.cfg.checkpoint.verify)
            for m in self.ref:
                m.eval().requires_grad_(False)
            log.info("reference model built for the KL term (kl_coef=%g)", loss.kl_coef)

    # ---- rollout --------------------------------------------------------------------------------------

    def _params(self) -> SamplingParams:
        g = self.g
        return SamplingParams(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k, max_new_tokens=g.max_new_tokens)

    def _sample_groups(self, count: int) -> list[list[Sample]]:
        prompts = [self.prompts[i] for i in self.sampler.take(count)]
        ids = [render_prompt(self.tokenizer, p.prompt, self.g.prefix, self.g.system_prompt) for p in prompts]
        flat = [(p, x) for p, x in zip(prompts, ids, strict=True) for _ in range(self.g.group_size)]
        completions = self.engine.generate([x for _, x in flat], self._params())
        samples = [Sample(p, x, c) for (p, x), c in zip(flat, completions, strict=True)]
        return [samples[i : i + self.g.group_size] for i in range(0, len(samples), self.g.group_size)]

    def _score(self, groups: list[list[Sample]]) -> None:
        samples = [s for grp in groups for s in grp]
        scores = self.scorer.score_completions(
            [s.prompt for s in samples],
            [s.completion for s in samples],
            self.g.max_new_tokens,
            bool(self.g.prefix),
            [str(g) for g, grp in enumerate(groups) for _ in grp],
        )
        for s, b in zip(samples, scores, strict=True):
            s.reward, s.values = b.total, b.values

    def _any_rank(self, flag: bool) -> bool:
        t = torch.tensor([int(flag)], device=current_device())
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())

    def _rollout(self, timing: dict[str, float]) -> tuple[list[list[Sample]], dict[str, float]]:
        """Sample and score this rank's groups (refilling zero-variance groups with dynamic sampling)."""
        kept: list[list[Sample]] = []
        spare: list[list[Sample]] = []
        stats = {"groups_sampled": 0.0, "zero_variance_groups": 0.0, "drafted": 0.0, "accepted": 0.0}
        for round_ in range(self.g.max_sampling_rounds if self.g.dynamic_sampling else 1):
            need = self.local_prompts - len(kept)
            # Every rank samples in every round (MoE layers exchange tokens across ranks in each forward).
            if round_ and not self._any_rank(need > 0):
                break
            t0 = time.perf_counter()
            groups = self._sample_groups(max(need, 1))
            t1 = time.perf_counter()
            for key in ("drafted", "accepted"):  # MTP drafts of speculative decoding
                stats[key] += self.engine.stats.extra.get(key, 0)
            self._score(groups)
            timing["rollout_s"] += t1 - t0
            timing["reward_s"] += time.perf_counter() - t1
            for grp in groups:
                flat = len({s.reward for s in grp}) == 1
                stats["groups_sampled"] += 1
                stats["zero_variance_groups"] += flat
                (spare if flat and self.g.dynamic_sampling else kept).append(grp)
        kept = (kept + spare)[: self.local_prompts]
        return kept, stats

    def _advantages(self, groups: list[list[Sample]]) -> None:
        samples = [s for grp in groups for s in grp]
        rewards = torch.tensor([s.reward for s in samples], dtype=torch.float64)
        loss = self.g.loss
        if loss.kl_coef > 0 and loss.kl_in_reward:
            old, ref, mask = padded_columns([s.completion.logprobs for s in samples], [s.ref_logprobs for s in samples])
            rewards = apply_kl_to_rewards(rewards, old, ref, mask, loss.kl_coef, loss.kl_estimator)
        group_ids = torch.arange(len(groups)).repeat_interleave(self.g.group_size)
        adv = compute_advantages(loss.adv_estimator, rewards.float(), group_ids=group_ids, eps=loss.adv_eps)
        for s, a in zip(samples, adv.tolist(), strict=True):
            s.advantage = a
            if self.g.overlong_filter and s.completion.finish_reason == "length":
                s.trained = False

    # ---- training batches ---------------------------------------------------------------------------

    def _plan(self, samples: Sequence[Sample]) -> Plan:
        """Micro-batches of ``samples``, as many on every rank: MoE layers exchange tokens in every forward and the
        loss shares assume it, so a rank whose responses pack into fewer rows runs empty micro-batches. With virtual
        pipeline stages the count is a multiple of PP (megatron's interleaved schedule runs groups of PP)."""
        if not self.budget:
            plan = plan_padded(len(samples), self.mbs)
            count = len(plan)
        else:
            plan = plan_packed([len(s) for s in samples], self.budget)
            most = torch.tensor([len(plan)], device=current_device())
            torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
            count = int(most.item())
        if self.cfg.parallel.vpp > 1:
            count = round_up(count, self.pp)
        return plan + [[[] for _ in range(self.mbs)] for _ in range(count - len(plan))]

    def _microbatches(
        self, samples: Sequence[Sample], plan: Plan, with_ref: bool
    ) -> tuple[Iterator[Batch], int | None]:
        """The micro-batches of ``plan`` (built as the schedule asks for them) and, under pipeline parallelism,
        their one width (stages exchange fixed-shape activations; else each is as wide as its longest row). Widths
        are multiples of TP (sequence parallelism splits rows over TP ranks)."""
        widths = self._widths(samples, plan)
        fixed = max(widths) if self.pp > 1 else None
        correct = self.g.loss.rollout_correction is not None
        batches = (
            make_batch(
                [[samples[i] for i in row] for row in mb], fixed or w, self.pad_id, with_ref=with_ref, correct=correct
            )  # fmt: skip
            for mb, w in zip(plan, widths, strict=True)
        )
        return batches, fixed

    def _widths(self, samples: Sequence[Sample], plan: Plan) -> list[int]:
        """Each micro-batch's width when stages need not agree: its longest row, rounded up to a multiple of TP."""
        rows = [[sum(len(samples[i]) for i in row) for row in mb] for mb in plan]
        return [round_up(max([*lengths, 1]), self.tp) for lengths in rows]

    def _reference_logprobs(self, samples: Sequence[Sample]) -> None:
        for s, logprobs in zip(samples, self._logprobs(self.ref, samples), strict=True):
            s.ref_logprobs = logprobs

    def _logprobs(self, chunks: Sequence[torch.nn.Module], samples: Sequence[Sample]) -> list[list[float]]:
        """The log-probabilities of each sample's response tokens under the model of ``chunks`` (no gradients)."""
        plan = self._plan(samples)
        batches, width = self._microbatches(samples, plan, with_ref=False)
        with torch.no_grad():
            if self.pp > 1:
                total = sum(len(s.completion.token_ids) for s in samples)
                flat = pipeline_forward_values(
                    self.cfg,
                    chunks,
                    batches,
                    self._logits_of,
                    self._response_logprobs,
                    len(plan),
                    total,
                    width,
                    self.mbs,
                )  # fmt: skip (the last stage computes them and broadcasts them to its pipeline group)
            else:
                parts = []  # on the device until one read at the end
                for b in batches:
                    b = to_device(b)
                    parts.append(self._response_logprobs(b, self._logits_of(chunks[0], b)))
                flat = torch.cat(parts)
        values = flat.tolist()
        out: list[list[float]] = [[] for _ in samples]
        offset = 0
        for i in (i for mb in plan for row in mb for i in row):  # the micro-batches' response order
            n = len(samples[i].completion.token_ids)
            out[i] = values[offset : offset + n]
            offset += n
        return out

    @staticmethod
    def _logits_of(model: torch.nn.Module, b: Batch) -> torch.Tensor:
        return forward_logits(model, b["tokens"], b["position_ids"], b.get("attention_mask"))

    def _response_logprobs(self, b: Batch, logits: torch.Tensor) -> torch.Tensor:
        """The log-probabilities of every response token of micro-batch ``b`` from its ``logits`` (b, s, V), flat
        in response order."""
        logp = token_logprobs(self._valid_vocab(logits.float()), b["labels"], temperature=self.g.temperature)
        values = response_values(logp, b["index"])  # (n, t)
        lengths = b["lengths"]  # (n,)
        return values[torch.arange(values.shape[1], device=values.device)[None] < lengths[:, None]]

    def _valid_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        return mask_padded_vocab(logits, len(self.tokenizer))

    def _forward_step(self, data_iterator: Iterator[Batch], model: torch.nn.Module) -> tuple[torch.Tensor, Any]:
        batch = next(data_iterator)
        args = (model, batch["tokens"], batch["position_ids"], batch.get("attention_mask"))
        if self.mtp_coef > 0:  # (b, s, V) and one (b, s, V) per MTP depth
            # The MTP term follows the policy without steering it: no MTP gradient into the decoder layers.
            logits, heads = forward_logits_mtp(*args, labels=batch["labels"], train_trunk=False)
        else:
            logits, heads = forward_logits(*args), []
        return logits, partial(self._loss, batch, heads)

    def _loss(
        self, batch: Batch, heads: list[torch.Tensor], logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        loss_cfg, mask, temperature = self.g.loss, batch["mask"], self.g.temperature
        index = batch["index"]  # (n, t) response label positions in the flattened rows
        logits = self._valid_vocab(logits.float())
        logp = response_values(token_logprobs(logits, batch["labels"], temperature=temperature), index)  # (n, t)
        entropy_logits = logits if loss_cfg.entropy_coef > 0 else logits.detach()
        entropy = response_values(entropy_from_logits(entropy_logits, temperature=temperature), index)  # (n, t)
        tokens, seqs = self._normalizers
        loss, metrics = compute_policy_objective(
            logp,
            batch["old_logp"],
            batch["advantages"],
            mask,
            loss_cfg,
            ref_logp=batch.get("ref_logp"),
            entropy=entropy,
            global_tokens=tokens,
            global_seqs=seqs,
            rollout_logp=batch.get("rollout_logp"),
        )
        ntok = mask.sum()
        share = torch.tensor(1.0 / self._scale, device=ntok.device)
        report = {}
        if heads:
            # depths x the global response tokens: micro-batches and ranks add up to the batch's token mean
            heads = [self._valid_vocab(z.float()) for z in heads]  # (b, s, V) each
            mtp_sum, correct, count = mtp_cross_entropy(heads, batch["labels"], batch["loss_mask"])
            mtp_loss = mtp_sum / (len(heads) * tokens)
            loss = loss + self.mtp_coef * mtp_loss
            metrics["loss"] = loss.detach()
            report["mtp_loss"] = torch.stack([mtp_loss.detach(), share])
            report["mtp_acc"] = torch.stack([correct, count])
        # megatron divides by the micro-batch count and data-parallel averaging divides by dp: undo both, so
        # gradients are those of the whole batch's loss.
        report.update({k: torch.stack([metrics[k].float(), share]) for k in SHARE_KEYS if k in metrics})
        token_keys = (*TOKEN_KEYS, *CORRECTION_KEYS)
        report.update({k: torch.stack([metrics[k].float() * ntok, ntok]) for k in token_keys if k in metrics})
        return loss * self._scale, torch.ones((), dtype=torch.int, device=ntok.device), report

    def _update(self, trainer: Trainer, samples: list[Sample]) -> dict[str, float]:
        """One optimizer update on ``samples`` (this rank's share of a mini-batch)."""
        counts = torch.tensor(
            [sum(len(s.completion.token_ids) for s in samples if s.trained), sum(s.trained for s in samples)],
            dtype=torch.float64,
            device=current_device(),
        )
        torch.distributed.all_reduce(counts, group=self.dp_group)
        counts = counts.tolist()
        self._normalizers = (max(float(counts[0]), 1.0), max(float(counts[1]), 1.0))
        with_ref = self.ref is not None and not self.g.loss.kl_in_reward
        plan = self._plan(samples)
        batches, width = self._microbatches(samples, plan, with_ref)
        self._scale = len(plan) * self.dp
        computed = sum(len(mb) * (width or w) for mb, w in zip(plan, self._widths(samples, plan), strict=True))
        self._layouts.append((len(plan), 1 - sum(len(s) for s in samples) / computed))
        keys = (*self.report_keys, *(CORRECTION_KEYS if self.g.loss.rollout_correction else ()),
                *(MTP_KEYS if self.mtp_coef > 0 else ()))  # fmt: skip
        return train_step(
            trainer, batches, self._forward_step, keys=keys, num_microbatches=len(plan), seq_length=width,
            micro_batch_size=self.mbs,
        )  # fmt: skip

    # ---- the step -----------------------------------------------------------------------------------

    def train_step(self, trainer: Trainer, step: int) -> dict[str, float]:
        """Rollout, reward, advantages and ``ppo_epochs * mini_batches`` updates; returns the step's metrics."""
        timing = {"rollout_s": 0.0, "reward_s": 0.0, "train_s": 0.0}
        self._layouts = []
        groups, stats = self._rollout(timing)
        samples = [s for grp in groups for s in grp]
        if self.ref is not None:
            self._reference_logprobs(samples)
        if self.g.loss.rollout_correction is not None:  # the trainer's old policy, for truncated IS
            for s, logprobs in zip(samples, self._logprobs(trainer.model, samples), strict=True):
                s.old_logprobs = logprobs
        self._advantages(groups)
        t0 = time.perf_counter()
        per_update = len(samples) // self.g.mini_batches
        updates: list[dict[str, float]] = []
        for _ in range(self.g.ppo_epochs):
            order = list(range(len(samples)))
            self.shuffle.shuffle(order)
            for k in range(self.g.mini_batches):
                chunk = [samples[i] for i in order[k * per_update : (k + 1) * per_update]]
                updates.append(self._update(trainer, chunk))
        timing["train_s"] = time.perf_counter() - t0
        metrics = {k: sum(u[k] for u in updates) / len(updates) for k in updates[0]}
        rollout, self._tokens = rollout_metrics(
            [s for grp in groups for s in grp], stats, timing, self.dp_group, self.g.updates_per_step
        )
        metrics.update(rollout)
        if self.g.speculative:
            metrics["spec_acceptance"] = stats["accepted"] / max(stats["drafted"], 1)  # this rank's MTP drafts
        counts, padding = zip(*self._layouts, strict=True)  # this rank's updates
        metrics.update(microbatches=sum(counts) / len(counts), pad_fraction=sum(padding) / len(padding))
        return metrics

    # ---- the rest of the Stage contract --------------------------------------------------------------

    def tokens_per_step(self) -> int:
        return self._tokens

    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        """R1's protocol on the held-out prompts: pass@1 over ``grpo.eval_samples`` samples, cons@k, format."""
        if not self.eval_set:
            return {}
        mine = self.eval_set[self.dp_rank :: self.dp]
        g = self.g
        params = SamplingParams(
            temperature=g.eval_temperature, top_p=g.eval_top_p, max_new_tokens=g.eval_max_new_tokens or g.max_new_tokens
        )
        state = self.engine.state_dict()
        self.engine.generator.manual_seed(self.cfg.data.seed + 104729 + self.dp_rank)  # same draws every evaluation
        results = evaluate_prompts(
            self.engine, self.eval_scorer, mine, g.eval_samples, params, g.prefix, g.system_prompt
        )
        self.engine.load_state_dict(state)
        gathered: list[Any] = [None] * self.dp
        torch.distributed.all_gather_object(gathered, results, group=self.dp_group)
        return {f"eval/{k}": v for k, v in summarize([r for part in gathered for r in part]).items()}

    def state_dict(self) -> dict[str, Any]:
        """Prompt sampler position, the rollout generator's state and the update shuffler's state."""
        return {
            "sampler": self.sampler.state_dict(),
            "generator": self.engine.generator.get_state().tolist(),
            "shuffle": list(self.shuffle.getstate()[1]),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.engine.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8, device="cpu"))
        self.shuffle.setstate((3, tuple(state["shuffle"]), None))

    def close(self) -> None:
        """Stop the verifier workers."""
        self.scorer.close()
        self.eval_scorer.close()
