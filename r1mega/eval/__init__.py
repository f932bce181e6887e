"""Evaluation: DeepSeek-R1's protocol (pass@1 over k samples, cons@k) on held-out prompts."""
