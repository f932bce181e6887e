"""``r1mega-eval``: DeepSeek-R1's evaluation protocol on a checkpoint (the work is in ``r1mega.eval.run``).

r1mega-eval checkpoint.load=runs/grpo/checkpoints model=qwen2_tiny data=cold_start \\
    data.eval_path=data/cold_start/eval_prompts.jsonl eval.samples=4 eval.output_dir=runs/grpo/eval
torchrun --nproc-per-node 2 -m r1mega.cli.eval parallel=ep2 checkpoint.load=...   # prompts split over ranks

Writes eval.json, eval.md and samples.jsonl to eval.output_dir (default <run_dir>/eval). Every training
override applies (model, parallel, precision, data.tokenizer, reward.num_workers, grpo.prefix, ...).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from r1mega.cli.jobs import main_for, run_job
from r1mega.config.load import CONFIG_MODULE


@hydra.main(config_path=f"pkg://{CONFIG_MODULE}", config_name="config", version_base="1.3")
def app(dcfg: DictConfig) -> None:
    """Evaluate the checkpoint and write the report."""
    from r1mega.eval.run import run_evaluation

    run_job(dcfg, run_evaluation)


def main() -> None:
    """Console entry point."""
    main_for(app)


if __name__ == "__main__":
    main()
