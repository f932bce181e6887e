"""One GRPO step: r1mega's GRPO stage against TRL's ``GRPOTrainer`` on CPU, same policy, prompts and settings.

Both sides start from the same weights (a tiny Qwen2-architecture policy built by r1mega, saved, and copied
into ``transformers.Qwen2ForCausalLM`` with r1mega's Qwen2 adapter), sample ``--group-size`` responses for
each of ``--prompts`` cold-start prompts (chat template + the ``<think>\\n`` prefix, T=1, top-p 1,
``--max-new-tokens``), score them with the same reward functions (r1mega's accuracy + format rewards in the
same verifier pool), and make one update with the same loss: GRPO advantages (group mean/std), PPO clip 0.2,
sequence-mean of token-mean aggregation (TRL's ``loss_type="grpo"``), no KL (TRL ``beta=0``: no reference
model on either side), one pass (``num_iterations=1``), AdamW at the same learning rate.

Timing: ``--steps`` steps on each side; the first is a warm-up and the median of the rest is reported. A
step's wall time covers rollout, reward and update on both sides. Rollout tokens/s counts generated tokens
over the time spent generating (TRL: time inside ``model.generate``; r1mega: the stage's ``rollout_s``).

Needs the ``bench`` extra: ``pip install -e '.[bench]'`` (trl). Example::

    python bench/grpo_vs_trl.py                   # 8 prompts x G=8, 64 new tokens, hidden 256
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="steps per side (the first is a warm-up)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--workdir", help="keep data and runs here (default: a temporary folder)")
    p.add_argument("--json", help="also write the results here")
    return p.parse_args(argv)


def _overrides(args: argparse.Namespace, data: Path) -> list[str]:
    heads = max(args.hidden // 64, 2)
    return [
        "model=qwen2_tiny",
        f"model.hidden_size={args.hidden}",
        f"model.num_layers={args.layers}",
        f"model.ffn_hidden_size={args.hidden * 3}",
        f"model.num_attention_heads={heads}",
        f"model.num_query_groups={max(heads // 2, 1)}",
        "stage=grpo",
        "data=cold_start",
        f"data.train_path={data / 'train.jsonl'}",
        f"data.eval_path={data / 'eval_prompts.jsonl'}",
        f"data.tokenizer={data / 'tokenizer'}",
        f"grpo.prompts_per_step={args.prompts}",
        f"grpo.group_size={args.group_size}",
        f"grpo.max_new_tokens={args.max_new_tokens}",
        "grpo.temperature=1.0",
        "grpo.loss.kl_coef=0",
        "grpo.loss.loss_agg_mode=seq-mean-token-mean",
        "reward.weights={accuracy: 1.0, format: 1.0}",
        "reward.num_workers=2",
        f"optim.micro_batch_size={args.group_size}",
        f"optim.train_steps={args.steps}",
        "optim.lr=1e-5",
        "optim.min_lr=1e-5",
        "optim.lr_warmup_steps=0",
        "optim.clip_grad=1.0",
        "stage.eval_interval=0",
        "checkpoint.save_interval=0",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
    ]


def prepare(args: argparse.Namespace, work: Path) -> tuple[list[str], Path, Path]:
    """Prompts + tokenizer, the initial r1mega weights, and the same weights as a Hugging Face folder."""
    from r1mega.checkpoint.weights import save_weights
    from r1mega.config.load import compose_config
    from r1mega.convert.convert import make_adapter
    from r1mega.data.coldstart import write_cold_start
    from r1mega.models.builder import build_model
    from r1mega.parallel.bootstrap import single_process

    data = work / "data"
    write_cold_start(str(data), num_train=200, num_eval=8, seed=0, tokenizer_out=str(data / "tokenizer"))
    overrides = _overrides(args, data)
    cfg = compose_config(overrides)
    init, hf_dir = work / "init", work / "hf"
    with single_process(cfg):
        torch.manual_seed(0)
        model = build_model(cfg)
        save_weights(model, str(init))
        adapter = make_adapter(cfg.model)
        state = {k: v for k, v in model[0].state_dict().items() if not k.endswith("_extra_state")}
        from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

        hf = Qwen2ForCausalLM(Qwen2Config(**adapter.hf_config()))
        hf.load_state_dict(adapter.to_hf_state_dict(state), strict=False)
        hf.save_pretrained(str(hf_dir))
        AutoTokenizer.from_pretrained(str(data / "tokenizer")).save_pretrained(str(hf_dir))
    return [*overrides, f"checkpoint.load={init}", f"run_dir={work / 'r1mega_run'}"], data, hf_dir


def run_r1mega(overrides: list[str]) -> dict[str, Any]:
    """``optim.train_steps`` GRPO steps in this process; per-step wall time and rollout tokens/s."""
    from r1mega.config.load import compose_config
    from r1mega.loop import train
    from r1mega.parallel.bootstrap import single_process

    cfg = compose_config(overrides)
    with single_process(cfg) as ctx:
        start = time.perf_counter()
        result = train(cfg, ctx)
        total = time.perf_counter() - start
    history = result.history
    times = [h["rollout_s"] + h["reward_s"] + h["train_s"] for h in history]
    return {
        "step_s": times,
        "rollout_tokens_per_s": [h["rollout_tokens_per_s"] for h in history],
        "response_length": [h["response_length"] for h in history],
        "phases_s": [{k: h[k] for k in ("rollout_s", "reward_s", "train_s")} for h in history],
        "total_s": total,
    }


class _StepClock:
    """A TrainerCallback that records each step's wall time."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t = 0.0

    def on_step_begin(self, *a: Any, **k: Any) -> None:
        self._t = time.perf_counter()

    def on_step_end(self, *a: Any, **k: Any) -> None:
        self.times.append(time.perf_counter() - self._t)

    def __getattr__(self, name: str) -> Any:  # every other callback event: no-op
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)


def run_trl(args: argparse.Namespace, data: Path, hf_dir: Path, work: Path) -> dict[str, Any]:
    """TRL's GRPOTrainer on the same weights, prompts, rewards and loss settings."""
    from datasets import Dataset
    from transformers import AutoTokenizer, Qwen2ForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from r1mega.config.schema import RewardConfig
    from r1mega.data.prompts import load_prompts
    from r1mega.rewards import RewardInput
    from r1mega.rewards.scorer import RewardScorer

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    prompts = load_prompts(str(data / "train.jsonl"))
    rows = [
        {
            "prompt": tok.apply_chat_template(
                [{"role": "user", "content": p.prompt}], tokenize=False, add_generation_prompt=True
            )
            + "<think>\n",
            "answer": p.answer,
            "task": p.task,
        }
        for p in prompts
    ]
    scorer = RewardScorer(RewardConfig(weights={"accuracy": 1.0, "format": 1.0}, num_workers=2))
    scorer.start()

    def reward(prompts: list[str], completions: list[str], answer: list[str], task: list[str], **_: Any) -> list[float]:
        inputs = [
            RewardInput(prompt=p, completion=c, answer=a, task=t, prefix_in_prompt=True)
            for p, c, a, t in zip(prompts, completions, answer, task, strict=True)
        ]
        return [b.total for b in scorer.score_batch(inputs)]

    model = Qwen2ForCausalLM.from_pretrained(str(hf_dir), attn_implementation="sdpa")
    gen = {"n": 0, "s": 0.0}
    generate = model.generate

    def timed_generate(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        out = generate(*a, **k)
        gen["s"] += time.perf_counter() - t0
        gen["n"] += int(
            (out[:, k["input_ids"].shape[1] if "input_ids" in k else a[0].shape[1] :] != tok.pad_token_id).sum()
        )
        return out

    model.generate = timed_generate
    batch = args.prompts * args.group_size
    config = GRPOConfig(
        output_dir=str(work / "trl_run"),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        num_generations=args.group_size,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        beta=0.0,
        epsilon=0.2,
        loss_type="grpo",
        num_iterations=1,
        max_steps=args.steps,
        use_cpu=True,
        bf16=False,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        seed=0,
        dataloader_num_workers=0,
    )
    clock = _StepClock()
    trainer = GRPOTrainer(
        model=model, reward_funcs=reward, args=config, train_dataset=Dataset.from_list(rows), processing_class=tok
    )
    trainer.add_callback(clock)
    per_step: list[dict[str, float]] = []
    last = dict(gen)

    class _Rollout(_StepClock):
        def on_step_end(self, *a: Any, **k: Any) -> None:
            per_step.append({"tokens": gen["n"] - last["n"], "s": gen["s"] - last["s"]})
            last.update(gen)

    trainer.add_callback(_Rollout())
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    scorer.close()
    return {
        "step_s": clock.times,
        "rollout_tokens_per_s": [p["tokens"] / max(p["s"], 1e-9) for p in per_step],
        "response_length": [p["tokens"] / batch for p in per_step],
        "total_s": total,
    }


def main(argv: list[str] | None = None) -> int:
    """Run both sides and print the ratios (and JSON with ``--json``)."""
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        overrides, data, hf_dir = prepare(args, work)
        ours = run_r1mega(overrides)
        theirs = run_trl(args, data, hf_dir, work)
    med = {
        name: statistics.median(side["step_s"][1:] or side["step_s"])
        for name, side in (("r1mega", ours), ("trl", theirs))
    }
    tps = {
        name: statistics.median(side["rollout_tokens_per_s"][1:] or side["rollout_tokens_per_s"])
        for name, side in (("r1mega", ours), ("trl", theirs))
    }
    result = {
        "settings": vars(args),
        "threads": torch.get_num_threads(),
        "r1mega": ours,
        "trl": theirs,
        "step_s_median": med,
        "rollout_tokens_per_s_median": tps,
        "speedup_step": med["trl"] / med["r1mega"],
        "speedup_rollout_tokens_per_s": tps["r1mega"] / tps["trl"],
    }
    print(
        f"GRPO step, {args.prompts} prompts x G={args.group_size}, {args.max_new_tokens} new tokens, hidden {args.hidden}:\n"
        f"  r1mega {med['r1mega']:.2f} s/step, rollout {tps['r1mega']:.0f} tok/s (mean length "
        f"{statistics.mean(ours['response_length']):.1f}); phases of the last step {ours['phases_s'][-1]}\n"
        f"  TRL    {med['trl']:.2f} s/step, rollout {tps['trl']:.0f} tok/s (mean length "
        f"{statistics.mean(theirs['response_length']):.1f})\n"
        f"  speed-up: {result['speedup_step']:.2f}x per step, {result['speedup_rollout_tokens_per_s']:.2f}x rollout tokens/s"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
