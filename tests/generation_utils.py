"""Inputs and launchers for the generation-job and short-SFT tests (rejection sampling, r1mega-eval, SFT): a tiny cold-start
set, a randomly initialised checkpoint of a tiny model, and the job CLIs run as 1 or N processes."""

from __future__ import annotations

from pathlib import Path

from ckpt_utils import run_trainer_ranks


def make_prompt_data(out: Path) -> Path:
    """A tiny cold-start set (train.jsonl, eval.jsonl, eval_prompts.jsonl) with its tokenizer."""
    from r1mega.data.coldstart import write_cold_start

    write_cold_start(str(out), num_train=24, num_eval=8, seed=5, tokenizer_out=str(out / "tokenizer"))
    return out


def make_checkpoint(out: Path, model: str = "qwen2_tiny") -> Path:
    """Randomly initialised weights of ``model`` saved as ``checkpoint.load`` reads them (one process)."""
    from r1mega.checkpoint.weights import save_weights
    from r1mega.config.load import compose_config
    from r1mega.models.builder import build_model
    from r1mega.parallel.bootstrap import single_process

    cfg = compose_config([f"model={model}"])
    with single_process(cfg):
        save_weights(build_model(cfg), str(out))
    return out


def job_args(data: Path, checkpoint: Path, model: str = "qwen2_tiny") -> list[str]:
    """Overrides every job test shares: the tiny model, its checkpoint, the cold-start files, few workers."""
    return [
        f"model={model}",
        "data=cold_start",
        f"data.train_path={data / 'train.jsonl'}",
        f"data.eval_path={data / 'eval_prompts.jsonl'}",
        f"data.tokenizer={data / 'tokenizer'}",
        f"checkpoint.load={checkpoint}",
        "reward.num_workers=1",
        "logging.progress_bar=false",
    ]


def run_job(module: str, args: list[str], run_dir: Path, ranks: int = 1, timeout: float = 300) -> list[str]:
    """Run ``python -m module args`` as ``ranks`` processes (torchrun's variables when more than one); return
    each rank's output headed ``[rc=N]``. Each process gets its own session, killed afterwards."""
    return run_trainer_ranks(args, run_dir, ranks, timeout=timeout, module=module)


def sft_args(data: Path, run_dir: Path | None, micro_batch: int = 2, global_batch: int = 4) -> list[str]:
    """Overrides of a short SFT run on a tiny cold-start set (``make_prompt_data``/``write_cold_start``);
    ``run_dir`` None leaves the run folder to the caller (the pipeline runner sets it)."""
    return [
        "stage=sft",
        "data=cold_start",
        f"data.train_path={data / 'train.jsonl'}",
        f"data.eval_path={data / 'eval.jsonl'}",
        f"data.tokenizer={data / 'tokenizer'}",
        "data.seq_length=256",
        f"optim.micro_batch_size={micro_batch}",
        f"optim.global_batch_size={global_batch}",
        "optim.lr_warmup_steps=0",
        "logging.progress_bar=false",
        *([f"run_dir={run_dir}"] if run_dir is not None else []),
    ]
