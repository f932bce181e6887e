"""The SFT stage on real megatron-core: packed documents are isolated, the CLI trains and evaluates,
malformed data fails with file:line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import zygote
from generation_utils import sft_args

from r1mega.config.load import compose_config
from r1mega.data.coldstart import write_cold_start
from r1mega.data.sft import PackedSequence, make_batch
from r1mega.models.builder import build_model
from r1mega.parallel.bootstrap import single_process


@pytest.fixture(scope="module")
def cold_start(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cold_start")
    write_cold_start(str(out), num_train=120, num_eval=16, seed=3, tokenizer_out=str(out / "tokenizer"))
    return out


@pytest.mark.parametrize("model", ["dsv3_tiny", "qwen2_tiny"])
def test_packed_documents_do_not_see_each_other(model: str) -> None:
    """A document's logits are the same packed behind another document as alone in its row."""
    # mtp off: megatron-core 0.16.1 GPTModel with MTP cannot run without labels
    cfg = compose_config([f"model={model}", "data.seq_length=48", "model.mtp_num_layers=0"])
    g = torch.Generator().manual_seed(0)
    first, second = (
        torch.randint(10, 2000, (20,), generator=g).tolist(),
        torch.randint(10, 2000, (17,), generator=g).tolist(),
    )
    packed = PackedSequence(first + second, [1] * 37, [20, 17])
    alone = PackedSequence(second, [1] * 17, [17])
    with single_process(cfg):
        model_chunk = build_model(cfg)[0].eval()
        with torch.no_grad():
            logits = []
            for row in (packed, alone):
                batch = make_batch([row], 48, pad_id=2)
                out = model_chunk(batch["tokens"], batch["position_ids"], batch["attention_mask"])  # (b, s, V)
                logits.append(out)
    torch.testing.assert_close(logits[0][0, 20:37], logits[1][0, :17], rtol=1e-5, atol=1e-5)
    # and the mask matters: without it the second document would attend to the first
    assert not torch.allclose(logits[0][0, 20:37], logits[0][0, :17])


@pytest.mark.slow
def test_sft_cli_trains_evaluates_and_checkpoints_the_data_position(cold_start: Path, tmp_path: Path) -> None:
    args = sft_args(cold_start, tmp_path) + ["optim.train_steps=4", "stage.eval_interval=2"]
    proc = zygote.run(["-m", "r1mega.cli.train", *args], timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("eval_loss=") == 2
    meta = json.loads((tmp_path / "checkpoints" / "step_00000004" / "meta.json").read_text())
    sampler = meta["stage_state"]["sampler"]
    assert sampler["position"] + sampler["epoch"] * 10**6 > 0, sampler


def test_malformed_jsonl_names_file_and_line(cold_start: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    lines = (cold_start / "train.jsonl").read_text().splitlines()[:5]
    lines[3] = '{"prompt": "2+2?", "response": 4}'
    bad.write_text("\n".join(lines) + "\n")
    args = sft_args(cold_start, tmp_path) + [f"data.train_path={bad}", "optim.train_steps=1"]
    proc = zygote.run(["-m", "r1mega.cli.train", *args], timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert f"{bad}:4" in last and "Traceback" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_sft_killed_mid_run_resumes_the_data_position_exactly(cold_start: Path, tmp_path: Path) -> None:
    """The sampler position travels in the checkpoint: a SIGKILLed SFT run resumes to identical weights."""
    from ckpt_utils import assert_identical, checkpoint_tensors, run_trainer

    args = sft_args(cold_start, Path("unused")) + ["optim.train_steps=4", "checkpoint.save_interval=2"]
    args = [a for a in args if not a.startswith("run_dir=")]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    assert run_trainer(args, straight).returncode == 0
    assert run_trainer(args, crashed, kill_at="train_step:3").returncode == -9
    resumed = run_trainer(args, crashed)
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr[-2000:]
    final = "checkpoints/step_00000004"
    assert_identical(checkpoint_tensors(straight / final), checkpoint_tensors(crashed / final))
