"""Analytic parameter and FLOP counts of the GPT model r1mega builds with megatron-core.

Pure Python: nothing here imports torch or megatron-core, so ``r1mega-check`` can size a 671B model in
well under a second. The counts reproduce megatron-core 0.16.1's ``GPTModel`` with r1mega's settings:
local (non-TE) layer specs, RMSNorm everywhere (weight only), no linear biases except Qwen2's Q/K/V bias
on the fused ``linear_qkv``, SwiGLU MLPs, rotary positions (no position-embedding parameters).
``tests/models/test_params.py`` compares them with a built model.

Conventions (the DeepSeek-V3 report's, so that V3 comes out as 671B total / 37B activated):

* ``total`` is the main model: embedding, decoder layers, final norm and output layer. It excludes the
  multi-token-prediction (MTP) module, reported separately as ``mtp``.
* ``mtp`` counts what megatron-core's ``MultiTokenPredictionLayer`` allocates: enorm, hnorm, ``eh_proj``
  (2h -> h), one transformer layer and its final norm. The MTP module shares the embedding and output
  layer with the main model, so they are not counted again (the Hugging Face checkpoint stores copies,
  which is why its MTP module is 14B there and about 11.7B here).
* ``activated`` is what one token touches in the main model: every non-expert parameter, embedding row
  and output layer included (as the V3 report counts them), plus ``moe_router_topk`` routed experts per
  MoE layer; the shared expert is a non-expert parameter and always counts.
* The router's ``expert_bias`` (aux-loss-free balancing) is a buffer, not a parameter: ``expert_bias``
  reports its size and nothing else includes it.
"""

from __future__ import annotations

from dataclasses import dataclass

from r1mega.config.schema import ModelConfig


@dataclass(frozen=True)
class LayerParams:
    """Parameters of one transformer layer (a decoder layer or an MTP layer), split by how they shard.

    ``attention``, ``attention_bias``, ``mlp`` and ``mtp_proj`` are split over tensor-parallel ranks;
    ``norms`` and ``router`` are replicated on every TP rank; ``experts`` are split over EP x ETP ranks.
    """

    index: int
    """Decoder layer index (0-based); an MTP layer k gets ``num_layers + k``."""
    moe: bool
    """Whether the MLP is a mixture of experts."""
    is_mtp: bool
    """Whether this is a multi-token-prediction layer."""
    attention: int
    """Attention projection weights (fused QKV + output, or the MLA down/up projections + output)."""
    attention_bias: int
    """Q/K/V bias (Qwen2); 0 otherwise."""
    mlp: int
    """The dense SwiGLU MLP, or in an MoE layer the shared expert (0 without one)."""
    norms: int
    """RMSNorm weights: input and pre-MLP norms, MLA's q/kv norms, MTP's enorm/hnorm/final norm."""
    router: int
    """MoE router weight (num_experts x hidden); 0 in a dense layer."""
    experts: int
    """All routed experts of the layer; 0 in a dense layer."""
    experts_active: int
    """The ``moe_router_topk`` routed experts one token goes through."""
    mtp_proj: int
    """MTP's ``eh_proj`` (2h -> h); 0 in a decoder layer."""

    @property
    def tp_sharded(self) -> int:
        """Parameters divided over the tensor-parallel group."""
        return self.attention + self.attention_bias + self.mlp + self.mtp_proj

    @property
    def replicated(self) -> int:
        """Non-expert parameters every tensor-parallel rank holds in full."""
        return self.norms + self.router

    @property
    def dense(self) -> int:
        """All non-expert parameters."""
        return self.tp_sharded + self.replicated

    @property
    def total(self) -> int:
        """All parameters of the layer."""
        return self.dense + self.experts

    @property
    def activated(self) -> int:
        """Parameters one token uses: all non-expert ones plus its top-k routed experts."""
        return self.dense + self.experts_active

    @property
    def matmul_activated(self) -> int:
        """Activated weights that multiply a token's activations (norms and biases are not matmuls)."""
        return self.attention + self.mlp + self.router + self.experts_active + self.mtp_proj


@dataclass(frozen=True)
class ModelParams:
    """Parameter counts of a whole model; see the module docstring for what each total includes."""

    layers: list[LayerParams]
    """Decoder layers, in order."""
    mtp_layers: list[LayerParams]
    """Multi-token-prediction layers (empty without MTP)."""
    embedding: int
    """Word embedding (padded vocabulary x hidden); split over TP ranks."""
    output: int
    """Output layer (padded vocabulary x hidden); 0 when tied to the embedding."""
    final_norm: int
    """Final RMSNorm of the decoder."""
    expert_bias: int
    """Aux-loss-free balancing biases (buffers, not parameters): num_experts per MoE layer, MTP included."""

    @property
    def decoder(self) -> int:
        """Parameters of the decoder layers."""
        return sum(layer.total for layer in self.layers)

    @property
    def total(self) -> int:
        """Main model: embedding + decoder layers + final norm + output layer (MTP excluded)."""
        return self.embedding + self.decoder + self.final_norm + self.output

    @property
    def experts(self) -> int:
        """Routed-expert parameters of the main model."""
        return sum(layer.experts for layer in self.layers)

    @property
    def activated(self) -> int:
        """Parameters one token uses in the main model (embedding and output layer included)."""
        return self.embedding + sum(layer.activated for layer in self.layers) + self.final_norm + self.output

    @property
    def mtp(self) -> int:
        """The MTP module's own parameters (it shares embedding and output with the main model)."""
        return sum(layer.total for layer in self.mtp_layers)

    @property
    def mtp_activated(self) -> int:
        """MTP parameters one token uses (top-k routed experts only)."""
        return sum(layer.activated for layer in self.mtp_layers)

    @property
    def total_with_mtp(self) -> int:
        """Every parameter megatron-core allocates once (shared weights counted once)."""
        return self.total + self.mtp


def _swiglu(hidden: int, ffn: int) -> int:
    """SwiGLU MLP weights: fc1 (h -> 2 x ffn, gate and up fused) and fc2 (ffn -> h)."""
    return hidden * 2 * ffn + ffn * hidden


def attention_params(m: ModelConfig) -> tuple[int, int, int]:
    """(projection weights, Q/K/V bias, norm weights) of one self-attention block, input norm excluded."""
    h, heads = m.hidden_size, m.num_attention_heads
    if not m.multi_latent_attention:
        qkv_out = (heads + 2 * m.query_groups) * m.head_dim
        weights = h * qkv_out + heads * m.head_dim * h  # linear_qkv + linear_proj
        return weights, qkv_out if m.add_qkv_bias else 0, 0
    q_head = m.qk_head_dim + m.qk_pos_emb_head_dim
    if m.q_lora_rank is None:
        q_weights, norms = h * heads * q_head, 0  # linear_q_proj
    else:
        q_weights = h * m.q_lora_rank + m.q_lora_rank * heads * q_head  # linear_q_down_proj + linear_q_up_proj
        norms = m.q_lora_rank  # q_layernorm
    kv_weights = h * (m.kv_lora_rank + m.qk_pos_emb_head_dim)  # linear_kv_down_proj (latent + shared RoPE key)
    kv_weights += m.kv_lora_rank * heads * (m.qk_head_dim + m.v_head_dim)  # linear_kv_up_proj
    norms += m.kv_lora_rank  # kv_layernorm
    proj = heads * m.v_head_dim * h  # linear_proj
    return q_weights + kv_weights + proj, 0, norms


def layer_params(m: ModelConfig, index: int, moe: bool, is_mtp: bool = False) -> LayerParams:
    """Parameters of one transformer layer (``is_mtp``: wrapped in an MTP layer)."""
    h = m.hidden_size
    attention, bias, attn_norms = attention_params(m)
    norms = 2 * h + attn_norms  # input_layernorm + pre_mlp_layernorm
    if moe:
        expert = _swiglu(h, m.moe_ffn_hidden_size)
        shared = m.moe_shared_expert_intermediate_size
        mlp = _swiglu(h, shared) if shared else 0
        router, experts, active = m.num_experts * h, m.num_experts * expert, m.moe_router_topk * expert
    else:
        mlp, router, experts, active = _swiglu(h, m.ffn_hidden_size), 0, 0, 0
    mtp_proj = 0
    if is_mtp:
        norms += 3 * h  # enorm, hnorm, final_layernorm
        mtp_proj = 2 * h * h  # eh_proj
    return LayerParams(
        index=index,
        moe=moe,
        is_mtp=is_mtp,
        attention=attention,
        attention_bias=bias,
        mlp=mlp,
        norms=norms,
        router=router,
        experts=experts,
        experts_active=active,
        mtp_proj=mtp_proj,
    )


def count_params(m: ModelConfig) -> ModelParams:
    """Count the parameters megatron-core builds for ``m`` (see the module docstring)."""
    pattern = m.moe_layer_pattern()
    layers = [layer_params(m, i, bool(moe)) for i, moe in enumerate(pattern)]
    # megatron-core gives each MTP layer the spec of the last decoder layer.
    mtp_layers = [layer_params(m, m.num_layers + k, bool(pattern[-1]), is_mtp=True) for k in range(m.mtp_num_layers)]
    vocab_h = m.padded_vocab_size * m.hidden_size
    moe_layers = sum(pattern) + (m.mtp_num_layers if pattern[-1] else 0)
    return ModelParams(
        layers=layers,
        mtp_layers=mtp_layers,
        embedding=vocab_h,
        output=0 if m.tie_word_embeddings else vocab_h,
        final_norm=m.hidden_size,
        expert_bias=moe_layers * m.num_experts if m.is_moe and m.moe_router_enable_expert_bias else 0,
    )


@dataclass(frozen=True)
class FlopsPerToken:
    """Floating-point operations per token of one sequence of ``seq_length`` tokens (causal)."""

    seq_length: int
    """Sequence length the attention term is computed for."""
    matmul: int
    """Forward FLOPs of the weight matmuls: 2 x activated matmul weights (no embedding lookup)."""
    attention: int
    """Forward FLOPs of the attention scores (QK^T) and the weighted sum of values, causal."""
    mtp: int
    """Forward FLOPs of the MTP module (its layers and its pass through the output layer); in the sums."""

    @property
    def forward(self) -> int:
        """Forward FLOPs per token, MTP included."""
        return self.matmul + self.attention + self.mtp

    @property
    def training(self) -> int:
        """Forward + backward (twice the forward) FLOPs per token."""
        return 3 * self.forward


def _attention_flops(m: ModelConfig, seq_length: int) -> int:
    """Causal score and value FLOPs per token of one layer: a token attends to seq_length / 2 keys on average."""
    if m.multi_latent_attention:
        qk, v = m.qk_head_dim + m.qk_pos_emb_head_dim, m.v_head_dim
    else:
        qk = v = m.head_dim
    # 2 FLOPs per multiply-add, (qk + v) per head and key, seq_length / 2 keys.
    return m.num_attention_heads * (qk + v) * seq_length


def flops_per_token(m: ModelConfig, seq_length: int) -> FlopsPerToken:
    """Forward and training FLOPs per token at ``seq_length`` (MTP included when the model has it)."""
    params = count_params(m)
    head = m.padded_vocab_size * m.hidden_size  # the output layer multiplies whether tied or not
    matmul = 2 * (sum(layer.matmul_activated for layer in params.layers) + head)
    attention = m.num_layers * _attention_flops(m, seq_length)
    mtp = sum(2 * (layer.matmul_activated + head) + _attention_flops(m, seq_length) for layer in params.mtp_layers)
    return FlopsPerToken(seq_length=seq_length, matmul=matmul, attention=attention, mtp=mtp)
