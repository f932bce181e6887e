"""The conversion audit: run the r1mega model and the Hugging Face model on the same tokens and compare.

Both run in fp32 (a bf16 checkpoint is upcast on both sides, so they hold the same weights). The report gives
the largest absolute logit difference over the real vocabulary and the greedy-token agreement (the share of
positions whose arg-max token is the same); the check fails when the difference exceeds
``atol + rtol * max|reference logit|``. Needs megatron-core's parallel state (one process is enough).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from r1mega.config.schema import R1Config


class VerificationError(RuntimeError):
    """The converted model does not reproduce the source model within tolerance."""


@dataclass(frozen=True)
class VerifyReport:
    """How closely the two models agree on the audit tokens."""

    max_abs_diff: float
    """Largest |logit difference| over every position and real vocabulary entry."""
    max_abs_logit: float
    """Largest |logit| of the reference model (the scale of the difference)."""
    greedy_agreement: float
    """Share of positions whose arg-max token agrees."""
    positions: int
    tolerance: float
    """The largest difference accepted."""

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def __str__(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return (
            f"{verdict}: max |logit diff| {self.max_abs_diff:.3g} (tolerance {self.tolerance:.3g}, logits up to "
            f"{self.max_abs_logit:.3g}), greedy-token agreement {self.greedy_agreement:.2%} over {self.positions} positions"
        )


def audit_tokens(vocab_size: int, batch: int = 2, seq: int = 32, seed: int = 0) -> torch.Tensor:
    """Fixed pseudo-random token ids ``(batch, seq)``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq), generator=generator)


def compare(reference: torch.Tensor, candidate: torch.Tensor, atol: float = 1e-4, rtol: float = 1e-4) -> VerifyReport:
    """Compare two ``(batch, seq, vocab)`` logit tensors."""
    reference, candidate = reference.float(), candidate.float()
    scale = reference.abs().max().item()
    agree = (reference.argmax(-1) == candidate.argmax(-1)).float()
    return VerifyReport(
        max_abs_diff=(reference - candidate).abs().max().item(),
        max_abs_logit=scale,
        greedy_agreement=agree.mean().item(),
        positions=agree.numel(),
        tolerance=atol + rtol * scale,
    )


def fp32_single_process(cfg: R1Config) -> R1Config:
    """``cfg`` for a one-process fp32 run with megatron's local layers (what the audit builds)."""
    from r1mega.config.schema import ParallelConfig

    precision = replace(cfg.precision, dtype="fp32", fp8=None, transformer_impl="local")
    return replace(cfg, parallel=ParallelConfig(world_size=1), precision=precision)


def load_r1mega(cfg: R1Config, checkpoint: str) -> list[torch.nn.Module]:
    """The r1mega model of ``cfg`` in fp32 with the weights of ``checkpoint`` (parallel state must exist)."""
    from r1mega.checkpoint.weights import load_weights
    from r1mega.models.builder import build_model

    chunks = build_model(fp32_single_process(cfg))
    load_weights(chunks, checkpoint)
    for chunk in chunks:
        chunk.eval()
    return chunks


@torch.no_grad()
def r1mega_logits(chunks: list[torch.nn.Module], tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Main-head logits ``(batch, seq, vocab_size)`` of a one-process r1mega model."""
    model = chunks[-1]
    heads: list[torch.Tensor] = []
    # megatron-core 0.16.1's GPTModel needs labels when it has MTP layers; the main head is the output
    # layer's last call (MTP heads come first). Cloned: the loss then works on the logits in place.
    hook = model.output_layer.register_forward_hook(lambda module, args, out: heads.append(out[0].clone()))
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    try:
        labels = tokens if model.config.mtp_num_layers else None
        model(tokens, positions, None, labels=labels)
    finally:
        hook.remove()
    return heads[-1].transpose(0, 1).float()[..., :vocab_size]  # (s, b, v) -> (b, s, v)


@torch.no_grad()
def hf_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Logits ``(batch, seq, vocab)`` of a ``transformers`` causal LM."""
    return model(input_ids=tokens, use_cache=False).logits.float()


def load_hf(directory: str) -> torch.nn.Module:
    """A Hugging Face model folder in fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def verify(
    cfg: R1Config,
    checkpoint: str,
    hf_model: torch.nn.Module,
    tokens: torch.Tensor | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-4,
) -> VerifyReport:
    """Compare the r1mega checkpoint with ``hf_model`` on ``tokens``; raises ``VerificationError`` above tolerance."""
    tokens = audit_tokens(cfg.model.vocab_size) if tokens is None else tokens
    chunks = load_r1mega(cfg, checkpoint)
    report = compare(hf_logits(hf_model, tokens), r1mega_logits(chunks, tokens, cfg.model.vocab_size), atol, rtol)
    if not report.passed:
        raise VerificationError(f"{checkpoint} does not reproduce the Hugging Face model: {report}")
    return report


@torch.no_grad()
def greedy_generate(
    chunks: list[torch.nn.Module], prompt: list[int], max_new_tokens: int, vocab_size: int, eos: int | None = None
) -> list[int]:
    """Greedy continuation of ``prompt`` by a one-process r1mega model (full forward per token, no cache)."""
    ids = list(prompt)
    for _ in range(max_new_tokens):
        logits = r1mega_logits(chunks, torch.tensor([ids]), vocab_size)
        ids.append(int(logits[0, -1].argmax()))
        if ids[-1] == eos:
            break
    return ids[len(prompt) :]
