"""Registers the schemas in Hydra's ConfigStore.

The top-level ``R1Config`` is stored as ``r1mega_schema`` and each group's schema as ``<group>/base``.
``conf/config.yaml`` starts from ``r1mega_schema``; every group YAML starts from its ``base``. Both are
typed, so an unknown key or a wrongly typed value fails while Hydra composes the config.
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from r1mega.config import schema

GROUPS = {
    "model": schema.ModelConfig,
    "parallel": schema.ParallelConfig,
    "precision": schema.PrecisionConfig,
    "optim": schema.OptimConfig,
    "checkpoint": schema.CheckpointConfig,
    "logging": schema.LoggingConfig,
    "stage": schema.StageConfig,
    "data": schema.DataConfig,
    "grpo": schema.GRPOConfig,
    "reward": schema.RewardConfig,
    "rejection": schema.RejectionConfig,
    "eval": schema.EvalConfig,
}


def register_configs() -> None:
    """Store every schema; safe to call more than once."""
    cs = ConfigStore.instance()
    cs.store(name="r1mega_schema", node=schema.R1Config)
    for group, node in GROUPS.items():
        cs.store(group=group, name="base", node=node)
