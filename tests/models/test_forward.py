"""The logits forwards on real megatron-core: ``forward_logits_mtp`` returns the main head's logits unchanged, the
MTP term built on its MTP logits has megatron's own MTP loss and gradients, and with ``train_trunk=False`` the same
gradients on the MTP block and none on the decoder layers (dsv3_tiny, fp32, one process)."""

from __future__ import annotations

import torch
from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler

from r1mega.config.load import compose_config
from r1mega.models.builder import build_model, transformer_config
from r1mega.models.forward import forward_logits, forward_logits_mtp
from r1mega.parallel.bootstrap import single_process
from r1mega.rl.mtp import mtp_cross_entropy

B, S = 2, 24


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def test_mtp_logits_give_megatrons_mtp_loss_and_gradients() -> None:
    cfg = compose_config(["precision=fp32", "model=dsv3_tiny", "model.moe_aux_loss_coeff=0"])
    with single_process(cfg):
        config = transformer_config(cfg)
        torch.manual_seed(0)
        model = build_model(cfg, config)[0]
        g = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, cfg.model.vocab_size, (B, S), generator=g)  # (b, s)
        positions = torch.arange(S)[None].expand(B, S)
        labels = torch.roll(tokens, -1, dims=1)  # (b, s)
        loss_mask = torch.zeros(B, S)
        loss_mask[0, 8:20] = 1  # two "responses" of different lengths
        loss_mask[1, 5:23] = 1

        plain = forward_logits(model, tokens, positions)
        main, heads = forward_logits_mtp(model, tokens, positions, None, labels)
        assert len(heads) == 1 and heads[0].shape == main.shape == (B, S, cfg.model.vocab_size)
        torch.testing.assert_close(main, plain, rtol=0, atol=0)

        total, _, count = mtp_cross_entropy(heads, labels, loss_mask)
        (total / count).backward()
        ours = _grads(model)
        main_only, heads = forward_logits_mtp(model, tokens, positions, None, labels, train_trunk=False)
        total, _, count = mtp_cross_entropy(heads, labels, loss_mask)
        (total / count).backward()
        follower = _grads(model)  # the MTP term that trains MTP without steering the decoder (GRPO's)
        torch.testing.assert_close(main_only, plain, rtol=0, atol=0)

        # megatron's definition: its MTP loss (scaling factor 1, one depth) reaches the weights through the main
        # output; the main loss itself is multiplied by 0.
        config.mtp_loss_scaling_factor = 1.0
        MTPLossAutoScaler.set_loss_scale(torch.tensor(1.0))
        out = model(tokens, positions, None, labels=labels, loss_mask=loss_mask)  # (b, s) main-head loss
        (out * 0).sum().backward()
        reference = _grads(model)

    mtp_params = [n for n in reference if n.startswith("mtp.")]
    trunk_params = [n for n in reference if n.startswith("decoder.")]
    assert mtp_params and trunk_params
    assert all(reference[n].abs().sum() > 0 for n in mtp_params)  # the MTP block is trained
    assert ours.keys() >= set(mtp_params) | set(trunk_params)
    for name, grad in reference.items():
        torch.testing.assert_close(ours[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    # train_trunk=False: the same gradients on the MTP block and the output layer, none on the decoder layers
    for name in [*mtp_params, "output_layer.weight"]:
        torch.testing.assert_close(follower[name], reference[name], rtol=1e-5, atol=1e-7, msg=name)
    assert all(name not in follower or follower[name].abs().sum() == 0 for name in trunk_params)
