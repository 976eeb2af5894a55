"""The Qwen2 mixture-of-transformers decoder of BAGEL: one attention, two experts.

Every layer holds an understanding expert (Qwen2 names) and a generation expert (`*_moe_gen`). A forward
call takes a packed query whose first `n_gen` rows are latent (VAE) tokens, routed to the generation
expert; the remaining rows (text, ViT tokens, image markers) use the understanding expert. Keys and values
are written into and read from a paged KV pool (`irg_core.kv_cache`), so all CFG branches of a denoising
step and every cached context share one set of buffers.

Precision follows the official code (BAGEL_SPEC §12): q/k/v and the KV cache are bfloat16, and "gen" mode
calls (VAE prefill, denoising) run the projections and MLPs on bfloat16 activations with float32 q/k norms
and RoPE. With bfloat16 weights most of these casts are no-ops; with float32 weights (CPU) the same
roundings are applied explicitly, which is what the goldens were computed with.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from irg_core.attention import AttnMeta, attend
from irg_core.config import LLMConfig


def bf16_round(x: Tensor) -> Tensor:
    """Round to bfloat16 values, keeping the dtype (a no-op for bfloat16 tensors)."""
    return x if x.dtype == torch.bfloat16 else x.to(torch.bfloat16).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def _linear_into(out: Tensor, x: Tensor, layer: nn.Linear) -> None:
    """out = layer(x), written into a slice of a preallocated buffer (no concatenation)."""
    if layer.bias is not None:
        torch.addmm(layer.bias, x, layer.weight.t(), out=out)
    else:
        torch.mm(x, layer.weight.t(), out=out)


def split_linear(x: Tensor, n_gen: int, und: nn.Linear, gen: nn.Linear) -> Tensor:
    """Rows [0, n_gen) through the generation expert's linear, the rest through the understanding one."""
    if n_gen == 0:
        return und(x)
    if n_gen == x.shape[0]:
        return gen(x)
    out = x.new_empty(x.shape[0], und.out_features)
    _linear_into(out[:n_gen], x[:n_gen], gen)
    _linear_into(out[n_gen:], x[n_gen:], und)
    return out


def split_apply(x: Tensor, n_gen: int, und: Callable[[Tensor], Tensor], gen: Callable[[Tensor], Tensor]) -> Tensor:
    """A row-wise function (norm, MLP) per expert; the results are placed in one buffer."""
    if n_gen == 0:
        return und(x)
    if n_gen == x.shape[0]:
        return gen(x)
    a, b = gen(x[:n_gen]), und(x[n_gen:])
    out = a.new_empty((x.shape[0], *a.shape[1:]))
    out[:n_gen] = a
    out[n_gen:] = b
    return out


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rope_tables(cfg: LLMConfig, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin [T, 1, head_dim] for 1-D positions: float32, then cast to the layer input dtype (as Qwen2)."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=positions.device).float() / d))
    angles = positions.float()[:, None] * inv_freq[None]  # [T, d/2]
    emb = torch.cat([angles, angles], dim=-1)[:, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


class MLP(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))

    def forward_bf16(self, x: Tensor) -> Tensor:
        """The MLP on bfloat16 activations (every intermediate rounded), as official gen mode runs it."""
        r = bf16_round
        return r(self.down_proj(r(r(nn.functional.silu(r(self.gate_proj(x)))) * r(self.up_proj(x)))))


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h, q, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.kv_dim
        for suffix in ("", "_moe_gen"):
            setattr(self, "q_proj" + suffix, nn.Linear(h, q, bias=True))
            setattr(self, "k_proj" + suffix, nn.Linear(h, kv, bias=True))
            setattr(self, "v_proj" + suffix, nn.Linear(h, kv, bias=True))
            setattr(self, "o_proj" + suffix, nn.Linear(q, h, bias=False))
            setattr(self, "q_norm" + suffix, RMSNorm(cfg.head_dim, cfg.rms_norm_eps))
            setattr(self, "k_norm" + suffix, RMSNorm(cfg.head_dim, cfg.rms_norm_eps))

    def forward(self, x: Tensor, n_gen: int, gen_mode: bool, rope: tuple[Tensor, Tensor],
                kv: tuple[Tensor, Tensor], slots: Tensor, meta: AttnMeta) -> Tensor:
        t = x.shape[0]
        if gen_mode:
            x = bf16_round(x)
        q = split_linear(x, n_gen, self.q_proj, self.q_proj_moe_gen).view(t, self.heads, self.head_dim)
        k = split_linear(x, n_gen, self.k_proj, self.k_proj_moe_gen).view(t, self.kv_heads, self.head_dim)
        v = split_linear(x, n_gen, self.v_proj, self.v_proj_moe_gen).view(t, self.kv_heads, self.head_dim)
        if gen_mode:  # bf16 projections, then float32 q/k norm and RoPE
            q, k, v = bf16_round(q).float(), bf16_round(k).float(), bf16_round(v)
        q = split_apply(q, n_gen, self.q_norm, self.q_norm_moe_gen)
        k = split_apply(k, n_gen, self.k_norm, self.k_norm_moe_gen)
        cos, sin = rope
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k_pool, v_pool = kv
        flat_k, flat_v = k_pool.view(-1, self.kv_heads, self.head_dim), v_pool.view(-1, self.kv_heads, self.head_dim)
        flat_k.index_copy_(0, slots, bf16_round(k).to(k_pool.dtype))
        flat_v.index_copy_(0, slots, bf16_round(v).to(v_pool.dtype))
        out = attend(bf16_round(q).to(k_pool.dtype), k_pool, v_pool, meta)  # [T, H, D]
        out = bf16_round(out).to(x.dtype).reshape(t, self.heads * self.head_dim)
        return bf16_round(split_linear(out, n_gen, self.o_proj, self.o_proj_moe_gen))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.mlp_moe_gen = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.input_layernorm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: Tensor, n_gen: int, gen_mode: bool, rope: tuple[Tensor, Tensor],
                kv: tuple[Tensor, Tensor], slots: Tensor, meta: AttnMeta) -> Tensor:
        a = split_apply(x, n_gen, self.input_layernorm, self.input_layernorm_moe_gen)
        h = x + self.self_attn(a, n_gen, gen_mode, rope, kv, slots, meta)
        m = split_apply(h, n_gen, self.post_attention_layernorm, self.post_attention_layernorm_moe_gen)
        if gen_mode:
            m = split_apply(bf16_round(m), n_gen, self.mlp.forward_bf16, self.mlp_moe_gen.forward_bf16)
        else:
            m = self.mlp(m)
        return h + m


class Qwen2Model(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LanguageModel(nn.Module):
    """`language_model` in the checkpoint: `.model` (embeddings, layers, norms) and `.lm_head`."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Qwen2Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], n_gen: int, gen_mode: bool,
                kv: list[tuple[Tensor, Tensor]], slots: Tensor, meta: AttnMeta) -> Tensor:
        """x [T, hidden] -> final-normed hidden states [T, hidden]; writes K/V of every row at `slots`.

        `rope` is `rope_tables(cfg, positions, x.dtype)`, computed once by the caller (it is the same at every
        denoising step)."""
        for layer, layer_kv in zip(self.model.layers, kv):
            x = layer(x, n_gen, gen_mode, rope, layer_kv, slots, meta)
        return split_apply(x, n_gen, self.model.norm, self.model.norm_moe_gen)

    # -- used by the step cache (irg_core.step_cache): the forward split at the final norm ----------------
    def hidden_states(self, x: Tensor, rope: tuple[Tensor, Tensor], n_gen: int, gen_mode: bool,
                      kv: list[tuple[Tensor, Tensor]], slots: Tensor, meta: AttnMeta) -> Tensor:
        """`forward` without the final norm: the last decoder layer's output [T, hidden]."""
        for layer, layer_kv in zip(self.model.layers, kv):
            x = layer(x, n_gen, gen_mode, rope, layer_kv, slots, meta)
        return x

    def final_norm(self, x: Tensor, n_gen: int) -> Tensor:
        """The final norm of `forward` (rows [0, n_gen) through the generation expert's)."""
        return split_apply(x, n_gen, self.model.norm, self.model.norm_moe_gen)
