"""The reward_model stage on real megatron-core: the Bradley-Terry loss by hand, training on the tiny
preference set lifts held-out accuracy above chance, the trained checkpoint scores GRPO rollouts through the
reward_model reward exactly as the stage evaluated them, the CLI resumes bit-identically with the head in the
checkpoint, and malformed data fails with file:line."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch
import zygote

from r1mega.checkpoint.manager import CheckpointManager
from r1mega.config.load import compose_config
from r1mega.config.validate import Accelerator, validate
from r1mega.data.coldstart import write_cold_start
from r1mega.data.preferences import read_preferences, response_ids, write_preferences
from r1mega.loop import setup
from r1mega.parallel.bootstrap import single_process
from r1mega.rewards import RewardInput, RewardScorer
from r1mega.rewards.reward_model import attach_reward_model
from r1mega.stages.reward_model import RewardModelStage, bradley_terry, pair_loss


@pytest.fixture(scope="module")
def prefs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("preferences")
    write_cold_start(str(out / "cold_start"), num_train=160, num_eval=40, seed=3, tokenizer_out=str(out / "tokenizer"))
    write_preferences(str(out / "cold_start"), str(out), num_train=0, num_eval=0, seed=0)
    return out


def rm_args(data: Path, *extra: str) -> list[str]:
    return [
        "stage=reward_model",
        "model=qwen2_tiny",
        "data=preferences",
        f"data.train_path={data / 'train.jsonl'}",
        f"data.eval_path={data / 'eval.jsonl'}",
        f"data.tokenizer={data / 'tokenizer'}",
        "data.seq_length=384",
        "optim.micro_batch_size=4",
        "optim.global_batch_size=8",
        "optim.lr=1e-3",
        "optim.min_lr=1e-4",
        "optim.lr_warmup_steps=0",
        "stage.eval_batches=10",
        "logging.progress_bar=false",
        *extra,
    ]


def test_shipped_configs_compose() -> None:
    cfg = compose_config([], config_name="reward_model_tiny")
    assert (cfg.stage.name, cfg.data.train_path) == ("reward_model", "data/preferences/train.jsonl")
    validate(cfg, accel=Accelerator(cuda=False, transformer_engine=False))
    grpo = compose_config(["stage=grpo", "data=cold_start", "reward=preference"])
    assert grpo.reward.weights["reward_model"] > 0 and grpo.reward.reward_model_path


def test_bradley_terry_by_hand() -> None:
    loss, correct, margin = bradley_terry(torch.tensor([2.0, 0.0, 1.0]), torch.tensor([0.0, 0.0, 3.0]))
    assert margin.tolist() == [2.0, 0.0, -2.0]
    assert loss.tolist() == pytest.approx([math.log(1 + math.exp(-2)), math.log(2), math.log(1 + math.exp(2))])
    assert correct.tolist() == [1.0, 0.0, 0.0]  # a tie is not a win
    assert bradley_terry(torch.tensor([1000.0]), torch.tensor([0.0]))[0].item() == 0.0  # stable far out
    assert bradley_terry(torch.tensor([0.0]), torch.tensor([1000.0]))[0].item() == 1000.0
    # the loss function reads each row's last token; rows are chosen_0, rejected_0, chosen_1, rejected_1
    values = torch.tensor([[9.0, 2.0, 7.0], [0.0, 9.0, 9.0], [1.0, 9.0, 9.0], [9.0, 3.0, 9.0]])  # (4, 3)
    total, count, report = pair_loss(torch.tensor([1, 0, 0, 1]), values)
    assert count.item() == 2 and total.item() == pytest.approx(math.log(1 + math.exp(-2)) + math.log(1 + math.exp(2)))
    assert report["rm_accuracy"].tolist() == [1.0, 2.0] and report["rm_margin"].tolist() == [0.0, 2.0]


@pytest.mark.slow
def test_training_beats_chance_and_the_reward_ranks_chosen_first(prefs: Path, tmp_path: Path) -> None:
    steps = 20
    cfg = compose_config(rm_args(prefs, f"optim.train_steps={steps}", f"run_dir={tmp_path}"))
    with single_process(cfg) as ctx:
        trainer, stage = setup(cfg, ctx)
        assert isinstance(stage, RewardModelStage)
        before = stage.evaluate(trainer)
        history = [stage.train_step(trainer, s) for s in range(steps)]
        after = stage.evaluate(trainer)
        print(f"held-out before {before}, after {steps} steps {after}")
        assert not any(m["skipped"] for m in history)
        assert after["eval_accuracy"] >= 0.7 and after["eval_accuracy"] > before["eval_accuracy"]
        assert after["eval_loss"] < before["eval_loss"] and after["eval_margin"] > 0
        CheckpointManager(cfg).save(steps, trainer, stage.state_dict())

        # The checkpoint as GRPO's reward: rollouts are the eval pairs' responses after the forced "<think>\n".
        reward = dataclasses.replace(
            cfg.reward, weights={"format": 1.0, "reward_model": 1.0}, reward_model_path=str(tmp_path / "checkpoints")
        )
        grpo_cfg = dataclasses.replace(cfg, reward=reward)
        scorer = RewardScorer(reward)
        attach_reward_model(scorer, grpo_cfg, stage.tokenizer)
        fits = lambda p: max(len(response_ids(stage.tokenizer, p.prompt, r)) for r in (p.chosen, p.rejected)) <= 384  # noqa: E731
        pairs = [p for p in read_preferences(prefs / "eval.jsonl") if fits(p)]  # the stage's held-out pairs
        pairs = pairs[: min(len(pairs) // 4, 10) * 4]  # those it evaluated
        samples = [
            RewardInput(prompt=p.prompt, completion=text.removeprefix("<think>\n"), prefix_in_prompt=True, group=p.id)
            for p in pairs
            for text in (p.chosen, p.rejected)
        ]
        model = scorer.specs["reward_model"].fn.keywords["model"]
        raw = torch.tensor(model.score(samples))  # (2n,)
        breakdowns = scorer.score_batch(samples)
    # the same tokens and weights as the stage's evaluation: the same accuracy and margin
    margins = raw[0::2] - raw[1::2]
    assert (margins > 0).float().mean().item() == pytest.approx(after["eval_accuracy"])
    assert margins.mean().item() == pytest.approx(after["eval_margin"], rel=1e-4, abs=1e-4)
    # normalised per group of two: the chosen response gets sigmoid(margin) > 0.5 exactly when it wins
    rm = torch.tensor([b.values["reward_model"] for b in breakdowns])
    torch.testing.assert_close(rm[0::2], torch.sigmoid(margins), rtol=1e-5, atol=1e-6)
    assert rm[0::2].mean() > 0.6 > rm[1::2].mean()
    assert all(b.values["format"] == 1.0 for b in breakdowns[0::2])


@pytest.mark.slow
def test_cli_resumes_bit_identically_with_the_head_in_the_checkpoint(prefs: Path, tmp_path: Path) -> None:
    from ckpt_utils import assert_identical, checkpoint_tensors, run_trainer

    args = rm_args(
        prefs, "optim.train_steps=4", "checkpoint.save_interval=2", "stage.eval_interval=2", "stage.eval_batches=1"
    )
    args += ["data.seq_length=256", "optim.micro_batch_size=2", "optim.global_batch_size=4"]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    first = run_trainer(args, straight)
    assert first.returncode == 0, first.stdout[-3000:]
    line = re.search(r"step 2 (.*)", first.stdout).group(1)
    assert {"rm_loss", "rm_accuracy", "rm_margin", "eval_loss", "eval_accuracy", "eval_margin"} <= set(
        re.findall(r"(\S+)=", line)
    )
    assert run_trainer(args, crashed, kill_at="train_step:3").returncode == -9
    resumed = run_trainer(args, crashed)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stdout[-2000:]
    final = "checkpoints/step_00000004"
    tensors = checkpoint_tensors(straight / final)
    assert {"value_head.weight", "value_head.bias"} <= set(tensors) and not any(
        k.startswith("output_layer") for k in tensors
    )
    assert_identical(tensors, checkpoint_tensors(crashed / final))
    meta = json.loads((straight / final / "meta.json").read_text())
    assert meta["config"]["stage"]["name"] == "reward_model" and meta["stage_state"]["sampler"]["position"] > 0


def test_malformed_pairs_name_file_and_line(prefs: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    lines = (prefs / "train.jsonl").read_text().splitlines()[:6]
    lines[4] = json.dumps({"prompt": "2+2?", "chosen": "4"})
    bad.write_text("\n".join(lines) + "\n")
    args = rm_args(prefs, f"data.train_path={bad}", "optim.train_steps=1", f"run_dir={tmp_path}")
    proc = zygote.run(["-m", "r1mega.cli.train", *args], timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert f"{bad}:5: 'rejected' must be a string" in last and "Traceback" not in proc.stderr, proc.stderr[-2000:]
