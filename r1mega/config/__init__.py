"""Typed configuration: schemas, Hydra composition and cross-group validation."""

from r1mega.config.errors import ConfigError
from r1mega.config.schema import (
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    PrecisionConfig,
    R1Config,
    StageConfig,
)

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "PrecisionConfig",
    "R1Config",
    "StageConfig",
]
