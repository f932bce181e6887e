"""r1mega: the DeepSeek-R1 training pipeline on megatron-core."""

__version__ = "0.1.0"
