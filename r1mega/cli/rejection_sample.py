"""``r1mega-rejection-sample``: sample a checkpoint, keep the correct and clean responses, write an SFT set
(the work is in ``r1mega.stages.rejection_sampling``; distillation traces too, see there).

r1mega-rejection-sample checkpoint.load=runs/grpo/checkpoints model=qwen2_tiny data=cold_start \\
    rejection.samples_per_prompt=8 rejection.output_dir=data/rs
r1mega-train stage=sft data=cold_start data.train_path=data/rs/train.jsonl checkpoint.load=...
r1mega-rejection-sample rejection=distill model=dsv3_tiny checkpoint.load=TEACHER ...   # teacher traces

Writes train.jsonl and summary.json to rejection.output_dir (default <run_dir>/rejection_sampling).
Prompts come from rejection.prompts_path (default data.train_path); under torchrun they are split over ranks.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from r1mega.cli.jobs import main_for, run_job
from r1mega.config.load import CONFIG_MODULE


@hydra.main(config_path=f"pkg://{CONFIG_MODULE}", config_name="config", version_base="1.3")
def app(dcfg: DictConfig) -> None:
    """Run rejection sampling and write the SFT set and summary."""
    from r1mega.stages.rejection_sampling import run_rejection_sampling

    run_job(dcfg, run_rejection_sampling)


def main() -> None:
    """Console entry point."""
    main_for(app)


if __name__ == "__main__":
    main()
