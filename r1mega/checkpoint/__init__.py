"""megatron-core distributed checkpoints: reshardable across TP/PP/EP layouts."""
