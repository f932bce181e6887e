"""Shared inputs of the GPU tests: the tiny cold-start set (made here, or carried to a GPU machine that lacks
reasoning-gym's compiled dependencies via ``R1MEGA_GPU_DATA``, as ``tools/gpu_check.sh`` does)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def cold_start(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train.jsonl, eval.jsonl, eval_prompts.jsonl and tokenizer/ of a tiny cold-start set."""
    carried = os.environ.get("R1MEGA_GPU_DATA")
    if carried and (Path(carried) / "train.jsonl").is_file():
        return Path(carried)
    from generation_utils import make_prompt_data

    return make_prompt_data(tmp_path_factory.mktemp("cold_start"))
