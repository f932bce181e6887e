"""Rollout: KV-cached batched sampling from r1mega models (latent cache for MLA)."""

from r1mega.rollout.engine import RolloutEngine
from r1mega.rollout.outputs import Completion, GenerationStats
from r1mega.rollout.sampling import SamplingParams

__all__ = ["Completion", "GenerationStats", "RolloutEngine", "SamplingParams"]
