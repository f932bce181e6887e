"""Every YAML under conf/ composes into typed objects; wrong configs fail at load time with one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

from r1mega.config.errors import ConfigError
from r1mega.config.load import available_options, compose_config
from r1mega.config.schema import R1Config
from r1mega.config.validate import Accelerator, validate

CONF = Path(__file__).resolve().parents[2] / "conf"
PIPELINE_GROUPS = ("pipeline",)
"""Groups of the r1mega-pipeline app (conf/r1_pipeline.yaml), tested in tests/pipeline/test_config.py."""
GROUPS = sorted(
    p.name for p in CONF.iterdir() if p.is_dir() and not p.name.startswith("_") and p.name not in PIPELINE_GROUPS
)
CPU = Accelerator(cuda=False, transformer_engine=False)
GPU = Accelerator(cuda=True, transformer_engine=True)


def _all_presets() -> list[tuple[str, str]]:
    return [(group, p.stem) for group in GROUPS for p in sorted((CONF / group).glob("*.yaml"))]


def test_conf_folder_is_what_the_package_ships() -> None:
    assert GROUPS == "checkpoint data eval grpo logging model optim parallel precision rejection reward stage".split()
    for group in GROUPS:
        assert available_options(group) == sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize(("group", "preset"), _all_presets())
def test_every_yaml_composes_and_validates(group: str, preset: str) -> None:
    overrides = [f"{group}={preset}"]
    if group == "parallel" and preset.startswith("dsv3_"):
        overrides.append("model=deepseek_v3")  # layouts planned for the full model
    if (group, preset) in (("stage", "sft"), ("stage", "grpo"), ("stage", "reward_model")):
        overrides.append("data=cold_start")  # SFT reads chat JSONL, GRPO prompts from it, reward_model pairs
    cfg = compose_config(overrides)
    assert isinstance(cfg, R1Config)
    accel = GPU if (group, preset) == ("precision", "fp8") else CPU
    validate(cfg, accel=accel)


def _repeated_defaults(node: DictConfig, schema: DictConfig, path: str) -> list[str]:
    """Keys of a preset whose value equals the schema's default, as ``dotted.key=value``."""
    found = []
    for key, value in node.items():
        if key == "defaults" or key not in schema:
            continue
        if OmegaConf.is_dict(value) and OmegaConf.is_dict(schema[key]):
            found += _repeated_defaults(value, schema[key], f"{path}.{key}")
        elif not OmegaConf.is_missing(schema, key) and value == schema[key]:
            found.append(f"{path}.{key}={value}")
    return found


def test_presets_state_only_what_differs_from_the_schema() -> None:
    """Defaults live in one place (the dataclass schema): a preset that repeats one would silently pin it."""
    schema = OmegaConf.structured(R1Config)
    repeated = [
        f"conf/{group}/{preset}.yaml: {key}"
        for group, preset in _all_presets()
        for key in _repeated_defaults(OmegaConf.load(CONF / group / f"{preset}.yaml"), schema[group], group)
    ]
    assert not repeated, "these keys repeat the schema's default; delete them:\n" + "\n".join(repeated)


def test_the_check_finds_a_repeated_default() -> None:
    schema = OmegaConf.structured(R1Config)
    preset = OmegaConf.create({"defaults": ["base"], "hidden_size": 8, "kv_lora_rank": 512, "mtp_num_layers": 1})
    assert _repeated_defaults(preset, schema.model, "model") == ["model.kv_lora_rank=512"]


@pytest.mark.parametrize("model", available_options("model"))
def test_every_model_with_every_small_layout(model: str) -> None:
    for layout in ("single", "tp2", "pp2"):
        cfg = compose_config([f"model={model}", f"parallel={layout}"])
        if model.endswith("tiny") or layout == "single":
            validate(cfg, accel=CPU)


def test_deepseek_v3_on_its_2048_gpu_layout() -> None:
    cfg = compose_config(["model=deepseek_v3", "parallel=dsv3_2048"])
    assert validate(cfg, accel=CPU) == 128


def test_te_fp8_needs_transformer_engine_on_a_gpu() -> None:
    validate(compose_config(["precision=fp8"]), accel=CPU)  # auto: the torch backend runs without TE
    cfg = compose_config(["precision=fp8", "precision.fp8_backend=te"])
    with pytest.raises(ConfigError, match=r"^precision\.fp8_backend='te' is invalid: .*Transformer Engine"):
        validate(cfg, accel=CPU)


WRONG = [
    (["model.nmu_layers=4"], "model.nmu_layers"),
    (["grpo.rollout_row_groups=0"], "grpo.rollout_row_groups"),
    (["grpo.rollout_row_groups=2", "grpo.rollout_batch=4"], "grpo.rollout_row_groups"),
    (["+model.bogus=1"], "model.bogus"),
    (["+bogus=1"], "bogus"),
    (["model.num_layers=four"], "model.num_layers"),
    (["model=dsv3_huge"], "model"),
    (["model.family=gpt5"], "model.family"),
    (["model.hidden_size=???"], "model.hidden_size"),  # a size no preset set: the schema has no default for it
    (["model.num_query_groups=3"], "model.num_query_groups"),
    (["model.moe_router_topk=9"], "model.moe_router_topk"),
    (["model.moe_router_group_topk=null"], "model.moe_router_group_topk"),
    (["model.moe_router_num_groups=3", "model.moe_router_group_topk=1"], "model.moe_router_num_groups"),
    (["model.moe_router_score_function=softmax"], "model.moe_router_enable_expert_bias"),
    (["parallel.tensor_model_parallel_size=0"], "parallel.tensor_model_parallel_size"),
    (["precision.dtype=fp16"], "precision.dtype"),
    (["optim.min_lr=1.0"], "optim.min_lr"),
    (["optim.lr_warmup_steps=1000"], "optim.lr_warmup_steps"),
]


@pytest.mark.parametrize(("overrides", "key"), WRONG)
def test_wrong_config_names_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        compose_config(overrides)
    message = str(info.value)
    assert message.startswith(f"{key}="), message
    assert "\n" not in message and "expected" in message


LAYOUT_WRONG = [
    (["parallel=tp2", "parallel.sequence_parallel=false"], 2, "parallel.sequence_parallel"),
    (["parallel=single", "parallel.sequence_parallel=true"], 1, "parallel.sequence_parallel"),
    (["parallel.world_size=null", "parallel.tensor_model_parallel_size=3"], 4, "parallel.tensor_model_parallel_size"),
    (["parallel.world_size=null", "parallel.expert_model_parallel_size=3"], 3, "parallel.expert_model_parallel_size"),
    (["parallel.world_size=null", "parallel.expert_model_parallel_size=4"], 2, "parallel.expert_model_parallel_size"),
    (
        ["model=qwen2_tiny", "parallel.world_size=null", "parallel.expert_model_parallel_size=2"],
        2,
        "parallel.expert_model_parallel_size",
    ),
    (
        ["parallel.world_size=null", "parallel.pipeline_model_parallel_size=3"],
        3,
        "parallel.pipeline_model_parallel_size",
    ),
    (["parallel=pp2", "parallel.virtual_pipeline_model_parallel_size=4"], 2, "parallel.pipeline_model_parallel_size"),
    (
        ["parallel=pp2", "parallel.num_layers_in_first_pipeline_stage=5"],
        2,
        "parallel.num_layers_in_first_pipeline_stage",
    ),
    (["parallel.num_layers_in_first_pipeline_stage=1"], 1, "parallel.num_layers_in_first_pipeline_stage"),
    (
        ["model=qwen2_tiny", "parallel.world_size=null", "parallel.tensor_model_parallel_size=8"],
        8,
        "model.num_attention_heads",
    ),
    (
        ["model=llama_tiny", "parallel.world_size=null", "parallel.tensor_model_parallel_size=4"],
        4,
        "model.num_query_groups",
    ),
    (["parallel=tp2", "data.seq_length=33"], 2, "data.seq_length"),
    (["data.seq_length=4096"], 1, "data.seq_length"),
    (["optim.global_batch_size=5"], 1, "optim.global_batch_size"),
    (["parallel=ep2", "optim.global_batch_size=2"], 2, "optim.global_batch_size"),
    (["parallel=tp2"], 4, "parallel.world_size"),
    (["parallel.world_size=null", "parallel.context_parallel_size=2"], 2, "parallel.context_parallel_size"),
    (["precision.transformer_impl=transformer_engine"], 1, "precision.transformer_impl"),
]


@pytest.mark.parametrize(("overrides", "world", "key"), LAYOUT_WRONG)
def test_wrong_layout_names_the_key(overrides: list[str], world: int, key: str) -> None:
    cfg = compose_config(overrides)
    with pytest.raises(ConfigError) as info:
        validate(cfg, world, accel=CPU)
    message = str(info.value)
    assert message.startswith(f"{key}="), message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["model.nmu_layers=4"], "model.nmu_layers"),
        (["parallel=tp2"], "parallel.world_size"),
        (["model=nope"], "model"),
    ],
)
def test_train_cli_exits_2_with_one_line(args: list[str], key: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "r1mega.cli.train", *args, f"run_dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(f"r1mega: config error: {key}="), proc.stderr
    assert "Traceback" not in proc.stderr
