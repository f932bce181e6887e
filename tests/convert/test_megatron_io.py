"""The r1mega side on disk: checkpoint keys <-> module names, and the streaming writer against megatron's own save.

The streaming writer builds the model on the meta device and lets megatron-core produce every key, shard and
object; filled with a real model's tensors its checkpoint holds exactly what ``save_weights`` writes.
"""

from __future__ import annotations

import torch

from r1mega.convert.megatron_io import (
    CheckpointReader,
    build_meta_model,
    checkpoint_location,
    module_name,
    write_checkpoint,
)


def test_expert_and_transformer_engine_names() -> None:
    name = "decoder.layers.3.mlp.experts.local_experts.5.linear_fc1.weight"
    key, expert = checkpoint_location(name)
    assert (key, expert) == ("decoder.layers.3.mlp.experts.experts.linear_fc1.weight", 5)
    assert module_name(key, expert) == name
    assert checkpoint_location("decoder.final_layernorm.weight") == ("decoder.final_layernorm.weight", None)
    assert (
        module_name("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight")
        == "decoder.layers.0.input_layernorm.weight"
    )
    assert (
        module_name("mtp.layers.0.transformer_layer.mlp.linear_fc1.layer_norm_weight")
        == "mtp.layers.0.transformer_layer.pre_mlp_layernorm.weight"
    )


def test_streaming_write_equals_megatron_save(tmp_path) -> None:
    """dsv3_tiny (MLA + MoE + shared expert + MTP): same keys, shapes and values as ``save_weights``."""
    from megatron.core import dist_checkpointing

    from r1mega.checkpoint.weights import save_weights
    from r1mega.config.load import compose_config
    from r1mega.models.builder import build_model
    from r1mega.parallel.bootstrap import single_process

    cfg = compose_config(["model=dsv3_tiny", "precision=fp32"])
    with single_process(cfg):
        chunks = build_model(cfg)
        with torch.no_grad():
            for name, buffer in chunks[0].named_buffers():
                if name.endswith("expert_bias"):
                    buffer.normal_()
        state = chunks[0].state_dict()
        save_weights(chunks, str(tmp_path / "megatron"))
        meta = build_meta_model(cfg)
        assert next(meta[0].parameters()).is_meta
        write_checkpoint(meta, tmp_path / "streamed", lambda name: state[name])
        expected = dist_checkpointing.load_plain_tensors(str(tmp_path / "megatron"))
        streamed = dist_checkpointing.load_plain_tensors(str(tmp_path / "streamed"))
    tensors = {k for k, v in expected.items() if torch.is_tensor(v)}
    assert tensors == {k for k, v in streamed.items() if torch.is_tensor(v)}
    assert all(torch.equal(expected[k], streamed[k]) for k in tensors)
    reader = CheckpointReader(tmp_path / "streamed")
    for name, value in state.items():
        if torch.is_tensor(value):
            assert torch.equal(reader.read(name), value), name
