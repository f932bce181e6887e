"""The pipeline report: accuracy table from step manifests, PNG curves from TensorBoard scalars."""

from __future__ import annotations

import json

import zygote
from torch.utils.tensorboard import SummaryWriter

from r1mega.pipeline.report import accuracy_table, read_scalars, write_report

METRICS = {"pass@1": 0.25, "cons@k": 0.5, "format_rate": 0.875, "response_length": 41.0, "accuracy/gcd": 0.5}


def test_accuracy_table_has_a_row_per_evaluated_step():
    table = accuracy_table(
        [
            {"name": "sft", "label": "cold-start SFT", "metrics": METRICS},
            {"name": "data", "metrics": {}},
            {"name": "grpo", "metrics": {**METRICS, "pass@1": 0.375, "accuracy/lcm": 0.0}},
        ]
    )
    lines = table.strip().splitlines()
    assert lines[0] == "| stage | pass@1 | cons@k | format | length | gcd | lcm |"
    assert lines[2] == "| cold-start SFT | 0.250 | 0.500 | 0.875 | 41.000 | 0.500 |  |"
    assert lines[3].startswith("| grpo | 0.375 |") and len(lines) == 4


def test_report_plots_training_curves(tmp_path):
    run = tmp_path / "grpo"
    writer = SummaryWriter(str(run / "tb"))
    for step in range(1, 6):
        writer.add_scalar("reward_mean", step / 10, step)
        writer.add_scalar("loss", 1 / step, step)
    writer.close()
    assert [s for s, _ in read_scalars(run / "tb")["reward_mean"]] == [1, 2, 3, 4, 5]
    manifests = [
        {"name": "grpo", "kind": "train", "outputs": {"run_dir": str(run)}, "metrics": METRICS, "seconds": 3.0}
    ]
    path = write_report(manifests, tmp_path / "report")
    text = path.read_text()
    assert "| grpo | 0.250 |" in text and "![grpo](grpo.png)" in text
    assert (tmp_path / "report" / "grpo.png").stat().st_size > 1000


def test_report_shows_what_transformers_generated_from_each_export(tmp_path):
    generations = tmp_path / "generations.json"
    rows = [
        {"prompt": "What is 2 | 3?", "completion": "2 + 3 = 5\n</think>\n\\boxed{5}", "answer": "5", "correct": True},
        {"prompt": "gcd(4, 6)?", "completion": "\\boxed{3}", "answer": "2", "correct": False},
    ]
    generations.write_text(json.dumps({"hf_dir": "run/export_qwen/hf", "generations": rows}))
    manifests = [
        {
            "name": "export_qwen",
            "label": "Qwen2 student",
            "kind": "export",
            "outputs": {"generations": str(generations)},
        },
        {"name": "export_llama", "kind": "export", "outputs": {"hf": "missing"}},
    ]
    text = write_report(manifests, tmp_path / "report").read_text()
    assert "### Qwen2 student: `run/export_qwen/hf`" in text and "1/2 right" in text
    assert "| What is 2 \\| 3? | 2 + 3 = 5 </think> \\boxed{5} | 5 | yes |" in text
    assert "export_llama:" not in text


def test_report_plots_the_curves_a_real_run_logged(tmp_path):
    """Runs log ``<stage>/<metric>`` tags (MetricsWriter): the report must find them, not draw empty axes."""

    from r1mega.pipeline.report import curve_count

    run = tmp_path / "base"
    args = ["optim.train_steps=4", "optim.lr_warmup_steps=0", "data.seq_length=32", "logging.progress_bar=false",
            f"run_dir={run}"]  # fmt: skip
    proc = zygote.run(["-m", "r1mega.cli.train", *args], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scalars = read_scalars(run / "tb")
    assert "pretrain/lm_loss" in scalars and "lm_loss" not in scalars  # what real runs write
    assert curve_count({"base": scalars}) >= 1
    manifests = [{"name": "base", "kind": "train", "outputs": {"run_dir": str(run)}, "metrics": {}, "seconds": 1.0}]
    text = write_report(manifests, tmp_path / "report").read_text()
    assert "![base](base.png)" in text and "No curve tags" not in text


def test_report_says_so_instead_of_drawing_empty_axes(tmp_path):
    writer = SummaryWriter(str(tmp_path / "run" / "tb"))
    writer.add_scalar("sft/something_else", 1.0, 1)
    writer.close()
    manifests = [{"name": "sft", "kind": "train", "outputs": {"run_dir": str(tmp_path / "run")}, "metrics": {}}]
    text = write_report(manifests, tmp_path / "report").read_text()
    assert "No curve tags" in text and "sft/something_else" in text
    assert not (tmp_path / "report" / "sft.png").exists()
