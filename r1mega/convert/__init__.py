"""Hugging Face <-> r1mega checkpoint conversion for the DeepseekV3, Qwen2 and Llama families.

``adapter`` (the contract) and one adapter per family (``llama``, ``qwen2``, ``deepseek_v3``) are pure tensor
maps; ``hf_io`` and ``megatron_io`` read and write each side one tensor at a time; ``convert`` runs an import
or an export; ``verify`` audits a conversion by comparing logits; ``cli`` is ``r1mega-convert``.
"""
