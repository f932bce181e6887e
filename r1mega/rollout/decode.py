"""Incremental (KV-cached) forward of an r1mega ``GPTModel`` for generation, on the model's own weights.

The training forward recomputes every position; generation needs one new token per step against a cache.
``CachedDecoder`` walks the same megatron-core modules (embedding, layers, final norm, output layer) and
reads their weights, so there is one set of weights and no conversion step between training and rollout:

- **MLA** runs in DeepSeek's absorbed form: the cache holds the normalised compressed KV and the RoPE'd
  decoupled key; the key up-projection is folded into the query (``q_nope @ W_UK``) and the value
  up-projection into the output (``(attn @ c) @ W_UV``), so keys and values are never expanded per head.
- **GQA** (Qwen2 / Llama) caches per-group keys and values; query heads of a group share one batched matmul.
- **MoE** layers on one process are computed by the decoder from the layer's modules: its router (scores,
  group-limited top-k, the expert bias), the routed experts on their tokens (as two grouped matmuls over
  stacked copies of the experts' weights where ``torch._grouped_mm`` runs: the CPU, bf16 on Hopper; else
  each busy expert in turn; grouped experts, ``model.moe_experts=grouped``, are stacked already) and the
  shared experts. Under expert or tensor parallelism the layers are
  called as modules (router, token dispatcher, experts), so expert parallelism works as in training; with
  sequence parallelism each TP rank routes its share of the tokens and the outputs are all-gathered.

Two ways to run a step. The *sliced* step (prefill, and decoding without CUDA graphs) writes the new
tokens at python-int slots ``[start, start + s)`` and attends to the cache up to there. The *static* step
(one token per row, what a CUDA graph captures) writes at a slot held in a device tensor
(``index_copy_``) and attends to a fixed number of leading cache slots, with the slots a row may not see
masked by the bias: every shape and address is fixed, so one captured graph serves every step of a
length bucket. Masked slots get probability exactly 0, so both steps compute the same attention.

Tensor parallelism: column-parallel weights give this rank's heads; row-parallel outputs and the vocab-
parallel embedding are all-reduced; logits are gathered over the vocabulary.

Pipeline parallelism (with virtual stages): a rank runs only its chunks' layers, in the training layout.
The first stage embeds; every other chunk receives the hidden states ``(s, b, hidden)`` from the chunk
before it in the pipeline order (stage ``r - 1``, or for a later virtual chunk of stage 0 the previous
chunk of the last stage) over the pipeline group, runs its layers against its own cache layers and sends
them on; only the last chunk of the last stage has the final norm and the output layer, and ``step``
returns None everywhere else. The engine samples there and sends the tokens to the pipeline group;
``run_chunk`` runs one chunk with an asynchronous send, for the engine's row groups in flight (``pipelined``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rope_utils import _rotate_half
from megatron.core.models.gpt import GPTModel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
)
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from r1mega.models.fp8 import fake_quantize_1x128, fake_quantize_128x128, fp8_blockwise_linear, is_fp8_layer
from r1mega.models.grouped_experts import TorchGroupedMLP
from r1mega.rollout.kv_cache import KVCache
from r1mega.utils.device import grouped_mm_works


@dataclass
class StepInputs:
    """Where the new tokens go and what they may attend to."""

    start: int
    """Cache slot of the first new token (all rows share slots; prompts are left-padded)."""
    positions: Tensor
    """(b, s) RoPE positions of the new tokens."""
    bias: Tensor
    """(b, s, keys) additive attention bias over the first ``keys`` cache slots: 0 where a query may attend,
    -inf elsewhere. The sliced step has ``keys = start + s``; the static step any ``keys > slot``."""
    slots: Tensor | None = None
    """(s,) int64 cache slots of the new tokens on the model's device (the static step; ``start`` is then
    unused), or None to write at ``[start, start + s)``."""
    row_slots: Tensor | None = None
    """(b, s) int64 cache slots per row (the per-row step of continuous batching and speculative decoding,
    where rows stand at different slots; ``start`` and ``slots`` are then unused)."""
    compiled: bool = False
    """Run each layer's compiled function (``CachedDecoder(compiled=True)``, one token per row at ``row_slots``)."""
    rope: dict[torch.dtype, tuple[Tensor, Tensor]] = field(default_factory=dict, repr=False)
    """RoPE cosine and sine tables at ``positions``, per dtype: computed by the first layer, reused by the rest."""

    def write(self, cache: Tensor, dim: int, new: Tensor) -> None:
        """Store ``new`` (the new tokens along ``dim``; batch along dim 0) in ``cache`` at this step's slots."""
        if self.row_slots is not None:
            rows = torch.arange(new.shape[0], device=new.device)[:, None]  # (b, 1)
            cache.movedim(dim, 1)[rows, self.row_slots] = new.movedim(dim, 1)  # (b, s, ...) into a view
        elif self.slots is not None:
            cache.index_copy_(dim, self.slots, new)
        else:
            cache.narrow(dim, self.start, new.shape[dim]).copy_(new)


def rollout_groups(
    config: TransformerConfig, groups: ProcessGroupCollection | None
) -> tuple[torch.distributed.ProcessGroup | None, ...]:
    """(tensor-parallel, expert-parallel, pipeline) groups a model built with ``config`` generates over; None
    where that dimension is 1. A split model needs its groups passed (``ParallelContext.groups``)."""
    tp, ep = config.tensor_model_parallel_size, config.expert_model_parallel_size
    pp = config.pipeline_model_parallel_size
    if groups is None:
        if tp > 1 or ep > 1 or pp > 1:
            raise ValueError(
                f"the model is split (TP={tp}, EP={ep}, PP={pp}): pass its process groups to the rollout engine "
                "(groups=ctx.groups from r1mega.parallel.bootstrap)"
            )
        return None, None, None
    return (groups.tp if tp > 1 else None), (groups.ep if ep > 1 else None), (groups.pp if pp > 1 else None)


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    var = x.float().pow(2).mean(-1, keepdim=True)
    return (x.float() * torch.rsqrt(var + eps)).to(x.dtype) * weight


def local_moe(mlp: MoELayer, tp: int) -> bool:
    """Whether the decoder computes the MoE layer ``mlp`` itself (``CachedDecoder._moe_local``): every expert on
    this process (no tensor or expert parallelism, ``tp`` = 1) as megatron-core's SequentialMLP, or as
    r1mega's ``TorchGroupedMLP`` where ``grouped_mm_works`` for its weights, in the plain configuration (no latent
    projection, no FP8, probabilities applied after the activation, no clamped or offset GLU); else
    megatron-core's layer (router, token dispatcher, experts) runs."""
    c, experts = mlp.config, mlp.experts
    if isinstance(experts, TorchGroupedMLP):
        supported = grouped_mm_works(experts.weight1.device, experts.weight1.dtype)
    else:
        supported = isinstance(experts, SequentialMLP)
    return (
        tp == 1
        and c.expert_model_parallel_size == 1
        and supported
        and not getattr(c, "moe_latent_size", None)
        and not c.moe_apply_probs_on_input
        and getattr(c, "activation_func_clamp_value", None) is None
        and not getattr(c, "glu_linear_offset", 0.0)
        and not any(is_fp8_layer(m) for m in mlp.modules())
    )


def grouped_moe(mlp: MoELayer, tp: int, device: torch.device | None = None) -> bool:
    """Whether the decoder runs the MoE layer ``mlp``'s experts as grouped matmuls (``_experts_grouped``) on
    ``device`` (default: where the experts are): its own MoE path (``local_moe``), experts without biases, no
    token dropping (every token has exactly top-k experts) and a device and weight dtype that
    ``grouped_mm_works`` for. Such a layer never reads the device on the host, so a CUDA graph can capture it."""
    if not local_moe(mlp, tp) or getattr(mlp.config, "moe_expert_capacity_factor", None) is not None:
        return False
    if isinstance(mlp.experts, TorchGroupedMLP):  # no biases (megatron-core's GroupedMLP refuses them)
        weight = mlp.experts.weight1
        return grouped_mm_works(device or weight.device, weight.dtype)
    experts = mlp.experts.local_experts
    fc1 = experts[0].linear_fc1
    biased = any(
        isinstance(b, Tensor) and b.numel()
        for e in experts
        for b in (getattr(e.linear_fc1, "bias", None), getattr(e.linear_fc2, "bias", None))
    )
    return not biased and grouped_mm_works(device or fc1.weight.device, fc1.weight.dtype)


def _stack_experts(mlp: MoELayer, out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """The weights of ``mlp``'s experts stacked, ``(E, out, in)`` for ``fc1`` and for ``fc2``: new tensors, or
    copied into ``out`` in place. Grouped experts (``TorchGroupedMLP``) are stacked already: views of their
    parameters, whatever ``out``."""
    experts = mlp.experts
    if isinstance(experts, TorchGroupedMLP):
        w1, w2 = experts.stacked_weights()
        return w1.transpose(1, 2), w2.transpose(1, 2)
    fc1, fc2 = out if out is not None else (None, None)
    return (
        torch.stack([e.linear_fc1.weight for e in experts.local_experts], out=fc1),
        torch.stack([e.linear_fc2.weight for e in experts.local_experts], out=fc2),
    )


class CachedDecoder:
    """KV-cached forward of a megatron-core ``GPTModel``: the whole model, or this rank's pipeline chunks
    (``model`` a list of chunks, in virtual-stage order, with ``pp_group`` the pipeline group)."""

    def __init__(
        self,
        model: GPTModel | Sequence[GPTModel],
        max_len: int,
        tp_group: dist.ProcessGroup | None = None,
        pp_group: dist.ProcessGroup | None = None,
        compiled: bool = False,
    ) -> None:
        self.chunks: list[GPTModel] = [model] if isinstance(model, torch.nn.Module) else list(model)
        self.model = model = self.chunks[0]
        """The first chunk (the config, RoPE tables and, on the first stage, the embedding)."""
        self.last = self.chunks[-1]
        """The last chunk (on the last stage: the final norm, the output layer and the MTP module)."""
        if pp_group is None and not (model.pre_process and self.last.post_process):
            raise ValueError(
                "the model is split into pipeline stages: pass the pipeline group to the decoder "
                "(groups=ctx.groups to the rollout engine)"
            )
        self.config = config = model.config
        self.mla = bool(getattr(config, "multi_latent_attention", False))
        self.tp_group = tp_group
        """The model's tensor-parallel group; None when it is not split (TP=1)."""
        self.tp = dist.get_world_size(tp_group) if tp_group is not None else 1
        self.tp_rank = dist.get_rank(tp_group) if tp_group is not None else 0
        self.pp_group = pp_group
        """The pipeline group; None when the whole model is on this rank (PP=1)."""
        if pp_group is not None:
            pp, r = dist.get_world_size(pp_group), dist.get_rank(pp_group)
            self.prev_rank = dist.get_global_rank(pp_group, (r - 1) % pp)
            self.next_rank = dist.get_global_rank(pp_group, (r + 1) % pp)
        self.is_last = self.last.post_process
        """Whether this rank computes logits (the last pipeline stage, or the whole model)."""
        self.dtype = next(p for c in self.chunks for p in c.parameters()).dtype
        self.layers = [layer for chunk in self.chunks for layer in chunk.decoder.layers]
        self.offsets = [0]
        """Index of each chunk's first layer in ``layers`` (and in the cache)."""
        for chunk in self.chunks[:-1]:
            self.offsets.append(self.offsets[-1] + len(chunk.decoder.layers))
        self.eps = config.layernorm_epsilon
        self.max_len = max_len
        self.freqs, self.mscale = self._rope_table(max_len)  # (max_len, rot_dim)
        if not self.mla and config.num_query_groups < self.tp:
            raise ValueError(
                f"the rollout engine needs model.num_query_groups ({config.num_query_groups}) >= tensor parallel "
                f"size ({self.tp})"
            )
        self._local: dict[int, bool] = {}
        """Per MoE layer (by ``id``): whether ``_moe_local`` computes it."""
        self._stacked: dict[int, tuple[Tensor, Tensor] | None] = {}
        """Per MoE layer that ``_moe_local`` computes (by ``id``): its experts' weights stacked for a grouped
        matmul, ``(E, out, in)`` for ``fc1`` and ``fc2``, or None where this device cannot multiply them grouped
        (``grouped_mm_works``). Copied from the experts by ``refresh_weights``, in place; grouped experts'
        (``TorchGroupedMLP``) are views of their parameters."""
        self.compiled = compiled
        """Whether one-token steps run compiled (``torch.compile``): one compiled function for the layers with a
        dense MLP, another for the attention half of MoE layers. Each has its own compile cache: torch runs a
        function eagerly once it has 8 variants, and each kind of layer makes 2-3 here (several rows, one row, and
        for MLA a first one with the attended length fixed)."""
        if compiled:
            if self.tp > 1 or pp_group is not None:
                raise ValueError(
                    f"compiled decode steps run a model that is whole on one process (TP={self.tp}, PP="
                    f"{config.pipeline_model_parallel_size}): turn rollout compilation off for a split model"
                )
            self._dense_step = torch.compile(self._layer_step, dynamic=True)
            self._moe_step = torch.compile(self._attention_step, dynamic=True)

    def grow(self, max_len: int) -> None:
        """RoPE tables for ``max_len`` positions, in place: the engine keeps a compiled decoder (and its compiled
        functions) for longer calls instead of building a new one."""
        self.max_len = max_len
        self.freqs, self.mscale = self._rope_table(max_len)

    # ---- building blocks -------------------------------------------------------------------------------

    def _rope_table(self, max_len: int) -> tuple[Tensor, float]:
        if self.mla:
            rope = self.layers[0].self_attention.rotary_pos_emb
            out = rope(max_len)
            emb, mscale = out if isinstance(out, tuple) else (out, 1.0)
        else:
            emb, mscale = self.model.rotary_pos_emb(max_len), 1.0
        return emb.reshape(max_len, -1).float(), float(mscale)  # (max_len, rot_dim)

    def _linear(self, module: torch.nn.Module, x: Tensor, weight: Tensor | None = None) -> Tensor:
        """A column-parallel (or duplicated) linear: this rank's output features, no communication."""
        ln = getattr(module, "layer_norm_weight", None)  # TE's fused LayerNormColumnParallelLinear
        if ln is not None:
            x = _rms_norm(x, ln, self.eps)
        bias = getattr(module, "bias", None)
        if bias is not None and getattr(module, "skip_bias_add", False):
            bias = None
        w = module.weight if weight is None else weight
        bias = bias if isinstance(bias, Tensor) and bias.numel() else None
        if is_fp8_layer(module):  # the training forward's FP8 GEMM, so rollout and training compute one function
            out = fp8_blockwise_linear(x, w)
            return out + bias if bias is not None else out
        return F.linear(x, w, bias)

    def _row(self, module: torch.nn.Module, x: Tensor) -> Tensor:
        """A row-parallel linear: partial sums all-reduced over tensor-parallel ranks."""
        out = fp8_blockwise_linear(x, module.weight) if is_fp8_layer(module) else F.linear(x, module.weight)
        if self.tp > 1:
            torch.distributed.all_reduce(out, group=self.tp_group)
        bias = getattr(module, "bias", None)
        if isinstance(bias, Tensor) and bias.numel():
            out = out + bias
        return out

    def _rope_tables(self, step: StepInputs, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The cosine and sine tables (s, b, 1, rot_dim) of ``step``'s positions, computed once per step."""
        tables = step.rope.get(dtype)
        if tables is None:
            freqs = self.freqs[step.positions.t()].unsqueeze(2)  # (s, b, 1, rot_dim)
            cos_ = (torch.cos(freqs) * self.mscale).to(dtype)
            sin_ = (torch.sin(freqs) * self.mscale).to(dtype)
            tables = step.rope[dtype] = (cos_, sin_)
        return tables

    def _rope(self, t: Tensor, step: StepInputs) -> Tensor:
        """RoPE on ``t`` (s, b, heads, d) at ``step.positions`` (b, s): megatron-core's
        ``_apply_rotary_pos_emb_bshd``, with the cosine and sine tables of a step computed once for all its
        layers (the same operations on the same tensors, so the same values)."""
        cos_, sin_ = self._rope_tables(step, t.dtype)
        rot_dim = cos_.shape[-1]
        t, t_pass = t[..., :rot_dim], t[..., rot_dim:]
        if self.mla:
            t = torch.cat((t[..., 0::2], t[..., 1::2]), dim=-1)
        t = (t * cos_) + (_rotate_half(t, self.config.rotary_interleaved) * sin_)
        return torch.cat((t, t_pass), dim=-1) if t_pass.shape[-1] else t

    def _embed(self, ids: Tensor) -> Tensor:
        """Token embeddings (s, b, h) for ``ids`` (s, b), summed over vocab-parallel shards."""
        emb = self.model.embedding.word_embeddings
        if self.tp == 1:
            return F.embedding(ids, emb.weight)
        outside = (ids < emb.vocab_start_index) | (ids >= emb.vocab_end_index)
        local = (ids - emb.vocab_start_index).masked_fill(outside, 0)
        out = F.embedding(local, emb.weight).masked_fill(outside[..., None], 0.0)
        torch.distributed.all_reduce(out, group=self.tp_group)
        return out

    # ---- attention ---------------------------------------------------------------------------------------

    def _mla(self, attn: torch.nn.Module, h: Tensor, step: StepInputs, latent: Tensor) -> Tensor:
        """Absorbed MLA on ``h`` (s, b, hidden) against the latent cache (b, max_len, r + dr)."""
        c = self.config
        s, b = h.shape[:2]
        n, dn, dr, dv, r = (
            attn.num_attention_heads_per_partition,
            c.qk_head_dim,
            c.qk_pos_emb_head_dim,
            c.v_head_dim,
            c.kv_lora_rank,
        )
        if c.q_lora_rank is not None:
            q = self._linear(attn.linear_q_up_proj, attn.q_layernorm(self._linear(attn.linear_q_down_proj, h)))
        else:
            q = self._linear(attn.linear_q_proj, h)
        q_nope, q_pe = q.view(s, b, n, dn + dr).split([dn, dr], dim=-1)  # (s, b, n, dn), (s, b, n, dr)
        kv_c, k_pe = self._linear(attn.linear_kv_down_proj, h).split([r, dr], dim=-1)  # (s, b, r), (s, b, dr)
        kv_c = attn.kv_layernorm(kv_c)
        ln = getattr(attn.linear_kv_up_proj, "layer_norm_weight", None)
        if ln is not None:
            kv_c = _rms_norm(kv_c, ln, self.eps)
        q_pe = self._rope(q_pe, step)
        k_pe = self._rope(k_pe.unsqueeze(2), step).squeeze(2)  # (s, b, dr)
        w_kv = attn.linear_kv_up_proj.weight  # (n * (dn + dv), r)
        if is_fp8_layer(attn.linear_kv_up_proj):  # absorbed form of its FP8 GEMM: the operands it would see
            kv_c, w_kv = fake_quantize_1x128(kv_c), fake_quantize_128x128(w_kv)
        end = step.bias.shape[-1]  # attended cache slots S
        step.write(latent, 1, torch.cat([kv_c, k_pe], dim=-1).transpose(0, 1))  # (b, s, r + dr)
        keys = latent[:, :end]  # (b, S, r + dr)
        w_kv = w_kv.view(n, dn + dv, r)
        w_uk, w_uv = w_kv[:, :dn], w_kv[:, dn:]  # (n, dn, r), (n, dv, r)
        q_lat = torch.einsum("sbnd,ndr->bsnr", q_nope, w_uk)  # (b, s, n, r)
        query = torch.cat([q_lat, q_pe.transpose(0, 1)], dim=-1).reshape(b, s * n, r + dr)
        scores = torch.bmm(query, keys.transpose(1, 2)).view(b, s, n, end).float() * attn.softmax_scale
        probs = torch.softmax(scores + step.bias[:, :, None, :], dim=-1).to(h.dtype)  # (b, s, n, S)
        ctx = torch.bmm(probs.view(b, s * n, end), keys[..., :r]).view(b, s, n, r)
        out = torch.einsum("bsnr,nvr->sbnv", ctx, w_uv).reshape(s, b, n * dv)
        return self._row(attn.linear_proj, out)

    def _gqa(self, attn: torch.nn.Module, h: Tensor, step: StepInputs, k_cache: Tensor, v_cache: Tensor) -> Tensor:
        """Grouped-query attention on ``h`` (s, b, hidden) against K/V caches (b, groups, max_len, d)."""
        s, b = h.shape[:2]
        ng = attn.num_query_groups_per_partition
        npg = attn.num_attention_heads_per_partition // ng
        d = attn.hidden_size_per_attention_head
        qkv = self._linear(attn.linear_qkv, h).view(s, b, ng, (npg + 2) * d)
        q, k, v = qkv.split([npg * d, d, d], dim=-1)
        q = q.reshape(s, b, ng * npg, d)
        if attn.q_layernorm is not None:
            q = attn.q_layernorm(q)
        if attn.k_layernorm is not None:
            k = attn.k_layernorm(k)
        q, k = self._rope(q, step), self._rope(k, step)
        end = step.bias.shape[-1]  # attended cache slots S
        step.write(k_cache, 2, k.permute(1, 2, 0, 3))  # (b, ng, s, d)
        step.write(v_cache, 2, v.permute(1, 2, 0, 3))
        q = q.view(s, b, ng, npg, d).permute(1, 2, 3, 0, 4).reshape(b, ng, npg * s, d)
        scale = attn.core_attention.softmax_scale if hasattr(attn.core_attention, "softmax_scale") else d**-0.5
        scores = torch.matmul(q, k_cache[:, :, :end].transpose(-1, -2)).view(b, ng, npg, s, end)
        probs = torch.softmax(scores.float() * scale + step.bias[:, None, None], dim=-1).to(h.dtype)
        ctx = torch.matmul(probs.view(b, ng, npg * s, end), v_cache[:, :, :end])  # (b, ng, npg * s, d)
        out = ctx.view(b, ng, npg, s, d).permute(3, 0, 1, 2, 4).reshape(s, b, ng * npg * d)
        return self._row(attn.linear_proj, out)

    # ---- MLP -----------------------------------------------------------------------------------------------

    def _mlp(self, mlp: torch.nn.Module, h: Tensor, scale: Tensor | None = None) -> Tensor:
        """An MLP block on ``h``; a dense one's activations times ``scale`` (tokens,) when given (a routed
        expert's routing probabilities, as megatron-core's ``MLP(per_token_scale=)``)."""
        if isinstance(mlp, MoELayer):
            return self._moe(mlp, h)
        x = self._linear(mlp.linear_fc1, h)
        if self.config.gated_linear_unit:
            gate, up = x.chunk(2, dim=-1)
            x = self.config.activation_func(gate) * up
        else:
            x = self.config.activation_func(x)
        if scale is not None:
            x = (x * scale[:, None]).to(h.dtype)
        return self._row(mlp.linear_fc2, x)

    def _moe(self, mlp: MoELayer, h: Tensor) -> Tensor:
        s, b, hidden = h.shape
        local = self._local.get(id(mlp))
        if local is None:
            local = self._local[id(mlp)] = self._local_moe(mlp)
        if local:
            return self._moe_local(mlp, h)
        if self.tp == 1 or not self.config.sequence_parallel:
            return mlp(h)[0]
        # Sequence-parallel semantics, as in training: each TP rank routes its share of the tokens.
        tokens = h.reshape(s * b, 1, hidden)
        share = -(-tokens.shape[0] // self.tp)
        tokens = F.pad(tokens, (0, 0, 0, 0, 0, share * self.tp - tokens.shape[0]))
        out = mlp(tokens[self.tp_rank * share : (self.tp_rank + 1) * share].contiguous())[0]
        out = gather_from_sequence_parallel_region(out, tensor_parallel_output_grad=False, group=self.tp_group)
        return out[: s * b].view(s, b, hidden)

    def _local_moe(self, mlp: MoELayer) -> bool:
        """Whether ``_moe_local`` computes this MoE layer (``local_moe``)."""
        return local_moe(mlp, self.tp)

    def _moe_local(self, mlp: MoELayer, h: Tensor) -> Tensor:
        """An MoE layer on ``h`` (s, b, hidden) without megatron-core's token dispatcher: the layer's own router
        (scores, group-limited top-k, the expert bias), then every expert on just the tokens routed to it,
        scaled by their routing probabilities after the activation (``MLP(per_token_scale=)``) and summed per
        token in expert order, plus the shared experts. The same products as the dispatcher's path.

        Where the device multiplies groups of rows by stacked weights (``grouped_mm_works``), the (token, expert)
        pairs are sorted by expert and each expert matrix is one grouped matmul over all experts: no host sync,
        so a CUDA graph can capture the layer, and on the CPU 2 calls instead of 2 linears per busy expert.
        Elsewhere (fp32 on CUDA) each busy expert runs on its rows, sized on the host."""
        s, b, hidden = h.shape
        probs, routing_map = mlp.router(h)  # (T, E) each: probabilities of the chosen experts, which they are
        x = h.reshape(s * b, hidden)
        stacked = self._stacked_weights(mlp)
        if stacked is not None:
            out = self._experts_grouped(x, probs, routing_map, *stacked)
        else:
            out = torch.zeros_like(x)
            counts = routing_map.sum(dim=0).tolist()  # tokens per expert (a host sync, as the dispatcher's)
            for e, (n, expert) in enumerate(zip(counts, mlp.experts.local_experts, strict=True)):
                if n:
                    rows = routing_map[:, e].nonzero().squeeze(1)  # (n,)
                    out.index_add_(0, rows, self._mlp(expert, x[rows], scale=probs[rows, e]))
        out = out.view(s, b, hidden)
        if mlp.use_shared_expert:
            shared = mlp.shared_experts
            z = self._mlp(shared, h)
            if shared.use_shared_expert_gate:
                z = z * torch.sigmoid(F.linear(h, shared.gate_weight))
            out = out + z
        return out

    def _experts_grouped(self, x: Tensor, probs: Tensor, routing_map: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
        """The routed experts on tokens ``x`` (T, hidden) as two grouped matmuls over the stacked weights ``w1``
        (E, fc1 out, hidden) and ``w2`` (E, hidden, fc2 in); ``probs``, ``routing_map``: (T, E) from the router.
        Every token has exactly top-k experts (no token dropping in ``_local_moe``'s configuration)."""
        k = self.config.moe_router_topk
        # (T, k) each token's experts, ascending (the order the per-expert loop adds them in)
        experts = routing_map.to(probs.dtype).topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values
        order = experts.reshape(-1).argsort(stable=True)  # (T * k,) the (token, expert) pairs by expert
        ends = routing_map.sum(dim=0).cumsum(dim=0).to(torch.int32)  # (E,) each expert's last pair + 1
        scale = probs.gather(1, experts).reshape(-1)[order]  # (T * k,)
        y = torch._grouped_mm(x[order // k], w1.transpose(1, 2), offs=ends)  # (T * k, fc1 out)
        if self.config.gated_linear_unit:
            gate, up = y.chunk(2, dim=-1)
            y = self.config.activation_func(gate) * up
        else:
            y = self.config.activation_func(y)
        y = (y * scale[:, None]).to(x.dtype)
        y = torch._grouped_mm(y, w2.transpose(1, 2), offs=ends)  # (T * k, hidden), by expert
        # Back to (token, expert) order by a gather (no atomic adds: the same sums on every run, deterministic mode
        # or not), then each token's k outputs summed.
        y = y[order.argsort()].view(x.shape[0], k, -1)
        return y.sum(dim=1) if k > 1 else y[:, 0]

    def _stacked_weights(self, mlp: MoELayer) -> tuple[Tensor, Tensor] | None:
        """``mlp``'s stacked expert weights (made on first use), or None where they are not multiplied grouped."""
        key = id(mlp)
        if key not in self._stacked:
            self._stacked[key] = _stack_experts(mlp) if grouped_moe(mlp, self.tp) else None
        return self._stacked[key]

    def refresh_weights(self) -> None:
        """Copy the experts' current weights into their stacked copies, in place (a captured graph reads those
        addresses): the engine calls this at the start of every ``generate``, since training updates the
        experts between calls. Grouped experts' stacked weights are views of their parameters: nothing to copy."""
        for layer in self.layers:
            stacked = self._stacked.get(id(layer.mlp))
            if stacked is not None:
                self._stacked[id(layer.mlp)] = _stack_experts(layer.mlp, out=stacked)

    # ---- the step ------------------------------------------------------------------------------------------

    def _block(self, x: Tensor, layer: torch.nn.Module, step: StepInputs, kv: tuple[Tensor, ...]) -> Tensor:
        """One transformer layer on ``x`` (s, b, hidden), against its cache tensors ``kv`` (``KVCache.layer``).
        A compiled step runs the layer's compiled function: one serves every layer (compiling takes as long for
        60 layers as for 2; the whole step unrolled took 189 s to compile for SmolLM2's 30 layers on 2 cores,
        against 13 s); MoE layers compile their attention half and run the MoE eagerly (``_moe``: host-sized
        expert batches)."""
        if step.compiled:
            inputs = (step.positions, step.bias, step.row_slots, *self._rope_tables(step, self.dtype))
            if not isinstance(layer.mlp, MoELayer):
                return self._dense_step(x, layer, inputs, kv)
            x, h = self._moe_step(x, layer, inputs, kv)
        else:
            x, h = self._attention_half(x, layer, step, kv)
        return x + self._mlp(layer.mlp, h)

    def _attention_half(
        self, x: Tensor, layer: torch.nn.Module, step: StepInputs, kv: tuple[Tensor, ...]
    ) -> tuple[Tensor, Tensor]:
        """A layer up to its MLP: the residual stream after attention, and its pre-MLP norm (the MLP's input)."""
        h = layer.input_layernorm(x)
        if self.mla:
            x = x + self._mla(layer.self_attention, h, step, kv[0])
        else:
            x = x + self._gqa(layer.self_attention, h, step, kv[0], kv[1])
        return x, layer.pre_mlp_layernorm(x)

    def run_chunk(
        self, c: int, ids: Tensor, step: StepInputs, cache: KVCache, sends: list[tuple[Any, Tensor]] | None = None
    ) -> Tensor | None:
        """This rank's chunk ``c`` on ``ids`` (b, s): embed them (the first stage's first chunk) or receive the
        hidden states (s, b, hidden) of the chunk before it, run the chunk's layers against their cache layers,
        and send the result to the next chunk; the model's last chunk returns it (before the final norm), every
        other returns None. With ``sends`` the send is asynchronous and its work is appended there (the caller
        waits for it: pipelined decoding keeps several row groups in flight)."""
        chunk = self.chunks[c]
        if chunk.pre_process:
            x = self._embed(ids.t())  # (s, b, hidden)
        else:
            x = torch.empty(ids.shape[1], ids.shape[0], self.config.hidden_size, dtype=self.dtype, device=ids.device)
            dist.recv(x, src=self.prev_rank, group=self.pp_group)  # (s, b, hidden) from the chunk before
        for i, layer in enumerate(chunk.decoder.layers, start=self.offsets[c]):
            x = self._block(x, layer, step, cache.layer(i))
        if chunk.post_process:
            return x
        x = x.contiguous()
        if sends is None:
            dist.send(x, dst=self.next_rank, group=self.pp_group)
        else:
            sends.append((dist.isend(x, dst=self.next_rank, group=self.pp_group), x))
        return None

    def _decode(self, ids: Tensor, step: StepInputs, cache: KVCache) -> Tensor | None:
        """This rank's decoder layers on ``ids`` (b, s): hidden states (s, b, hidden) before the final norm
        on the last pipeline stage, None on the others (which send theirs on)."""
        x = None
        for c in range(len(self.chunks)):
            x = self.run_chunk(c, ids, step, cache)
        return x

    def logits(self, x: Tensor) -> Tensor:
        """Full-vocab fp32 logits (b, V) of the last position of the decoder's output ``x`` (s, b, hidden)."""
        h = self.last.decoder.final_layernorm(x[-1:])  # (1, b, hidden)
        return self.head(h)[:, 0]  # (b, V)

    def step(self, ids: Tensor, step: StepInputs, cache: KVCache) -> Tensor | None:
        """Run ``ids`` (b, s) at cache slots ``[start, start + s)``; full-vocab fp32 logits (b, V) of the
        last position of each row (None on a pipeline stage other than the last). One-token steps run
        compiled when the decoder was built with ``compiled=True``."""
        if self.compiled and ids.shape[1] == 1:
            row_slots = step.row_slots
            if row_slots is None:  # one slot for every row, as per-row slots: one compiled variant for both loops
                slot = step.slots.view(1, 1) if step.slots is not None else torch.tensor([[step.start]])
                row_slots = slot.to(ids.device).expand(ids.shape[0], 1).contiguous()  # (b, 1)
            # The default loop passes slices of its buffers, the per-row loop new tensors: torch guards on a view's
            # base and on strides, so each kind would be another compiled variant. The copies are a few KB.
            positions, bias = (t.clone(memory_format=torch.contiguous_format) for t in (step.positions, step.bias))
            step = StepInputs(0, positions, bias, row_slots=row_slots, compiled=True)
            with torch.compiler.set_stance("default"):  # CPU runs set force_eager for megatron's own helpers
                x = self._decode(ids, step, cache)
        else:
            x = self._decode(ids, step, cache)
        return None if x is None else self.logits(x)

    def _attention_step(
        self, x: Tensor, layer: torch.nn.Module, inputs: tuple[Tensor, ...], kv: tuple[Tensor, ...]
    ) -> tuple[Tensor, Tensor]:
        """What the decoder compiles for an MoE layer: ``layer`` on ``x`` (1, b, hidden) up to its MLP (the
        residual stream after attention, and the MLP's input). ``inputs``: the step's positions (b, 1), key
        bias (b, 1, S), cache slots to write (b, 1) and RoPE cosine and sine tables. Tensors and modules only,
        so that one compiled function (dynamic shapes) serves every layer, batch size, attended length and cache."""
        positions, bias, row_slots, cos_, sin_ = inputs
        step = StepInputs(0, positions, bias, row_slots=row_slots, rope={cos_.dtype: (cos_, sin_)})
        return self._attention_half(x, layer, step, kv)

    def _layer_step(
        self, x: Tensor, layer: torch.nn.Module, inputs: tuple[Tensor, ...], kv: tuple[Tensor, ...]
    ) -> Tensor:
        """What the decoder compiles for a layer with a dense MLP: the whole layer (``_attention_step``'s
        arguments)."""
        x, h = self._attention_step(x, layer, inputs, kv)
        return x + self._mlp(layer.mlp, h)

    def hidden(self, ids: Tensor, step: StepInputs, cache: KVCache) -> Tensor:
        """Final-normed hidden states (s, b, hidden) of every position of ``ids`` (b, s): what the output
        layer and the MTP module read (the whole model on this rank)."""
        return self.last.decoder.final_layernorm(self._decode(ids, step, cache))

    def head(self, h: Tensor) -> Tensor:
        """Full-vocab fp32 logits (b, s, V) of final-normed hidden states ``h`` (s, b, hidden)."""
        last = self.last
        weight = last.shared_embedding_or_output_weight() if last.share_embeddings_and_output_weights else None
        logits = self._linear(last.output_layer, h, weight)
        if self.tp > 1:
            logits = gather_from_tensor_model_parallel_region(logits, group=self.tp_group)
        return logits.transpose(0, 1).float()  # (b, s, V)

    # ---- multi-token prediction ----------------------------------------------------------------------------

    @property
    def has_mtp(self) -> bool:
        """Whether the model has megatron-core MTP layers (DeepSeek-V3's multi-token prediction)."""
        return getattr(self.last, "mtp", None) is not None and len(self.last.mtp.layers) > 0

    def mtp_hidden(self, hidden: Tensor, next_ids: Tensor, step: StepInputs, cache: KVCache) -> Tensor:
        """The first MTP module on the main model's final-normed ``hidden`` (s, b, h) and the ids of the
        tokens that follow each position, ``next_ids`` (b, s); its cache is layer ``len(self.layers)``.
        Returns its final-normed hidden states (s, b, h), whose logits (``head``) predict the token after.

        As in megatron-core's ``MultiTokenPredictionLayer``: ``eh_proj([enorm(embed(next)); hnorm(h)])``,
        one transformer layer, the MTP module's final norm; the embedding and output head are the model's.
        """
        mtp = self.last.mtp.layers[0]
        e = mtp.enorm(self._embed(next_ids.t()))  # (s, b, h)
        x = self._linear(mtp.eh_proj, torch.cat([e, mtp.hnorm(hidden)], dim=-1))  # (s, b, h)
        x = self._block(x, mtp.transformer_layer, step, cache.layer(len(self.layers)))
        return mtp.final_layernorm(x)
