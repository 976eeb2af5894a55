"""The Qwen2 mixture-of-transformers decoder of BAGEL: one attention, two experts.

Every layer holds an understanding expert (Qwen2 names) and a generation expert (`*_moe_gen`). A packed forward
call takes query rows in contiguous *groups* (`RowGroups`), each routed to one expert: latent (VAE) rows to the
generation expert, text, ViT tokens and image markers to the understanding expert. The matrix products run
per group, so rows packed from several trajectories get exactly the products they would get alone (a CPU GEMM's
rounding depends on how many rows it sees). Keys and values are written into and read from a paged KV pool
(`irg_core.kv_cache`), so all CFG branches of a denoising step and every cached context share one set of buffers.

The text decode step has its own path (`LanguageModel.decode_step`): understanding expert only, q/k/v and
gate/up products fused (the experts' weights are re-pointed into one buffer by `fuse_projections`, no copy),
RoPE from a table, and attention over device buffers — a pure function a CUDA graph can hold.

Precision follows the official code (BAGEL_SPEC §12): q/k/v and the KV cache are bfloat16, and "gen" mode
calls (VAE prefill, denoising) run the projections and MLPs on bfloat16 activations with float32 q/k norms
and RoPE. With bfloat16 weights most of these casts are no-ops; with float32 weights (CPU) the same
roundings are applied explicitly, which is what the goldens were computed with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from irg_core.attention import AttnMeta, DecodeBuffers, SdpaBackend
from irg_core.config import LLMConfig
from irg_core.model.embed import table_embedding


def bf16_round(x: Tensor) -> Tensor:
    """Round to bfloat16 values, keeping the dtype (a no-op for bfloat16 tensors)."""
    return x if x.dtype == torch.bfloat16 else x.to(torch.bfloat16).to(x.dtype)


def cast(x: Tensor, dtype: torch.dtype) -> Tensor:
    """x in `dtype` (no operation at all when it already is)."""
    return x if x.dtype == dtype else x.to(dtype)


def rows_linear(x: Tensor, weight: Tensor, bias_col: Tensor | None = None) -> Tensor:
    """`F.linear` for the few rows of a decode step: computed as weight @ x^T, one pass of the BLAS over the
    weight whatever the number of rows. `F.linear` itself, with 2-16 rows, takes a path that is several times
    slower on some CPUs (MKL on an AVX2 EPYC: 3.3x the 1-row time at 4 rows for the vocabulary projection,
    5x for gate/up; this form: 1.07x and 0.55x). The result is a transposed view. `bias_col` is the bias as a
    column [out, 1]. `MLP.forward_fused` uses the same form inline, keeping its [features, rows] layout between
    its two products."""
    if bias_col is None:
        return torch.mm(weight, x.t()).t()
    return torch.addmm(bias_col, weight, x.t()).t()


def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """Qwen2's RMSNorm: normalise in float32, cast back to the input dtype, then scale by the weight.
    (`F.rms_norm` of a bf16 tensor computes in float32 and rounds once, which is that first step.)"""
    shape = (x.shape[-1],)
    if x.dtype == torch.float32 and (weight is None or weight.dtype == torch.float32):
        return F.rms_norm(x, shape, weight, eps)
    y = F.rms_norm(x, shape, None, eps)
    return y if weight is None else weight * y


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


@dataclass(frozen=True, slots=True)
class RowGroups:
    """Contiguous row ranges of a packed query and the expert of each: (start, end, generation expert?)."""

    groups: tuple[tuple[int, int, bool], ...]

    @classmethod
    def split(cls, total: int, n_gen: int) -> RowGroups:
        """One trajectory's rows: the first `n_gen` to the generation expert, the rest to understanding."""
        parts = ((0, n_gen, True),) if n_gen else ()
        return cls(parts + (((n_gen, total, False),) if total > n_gen else ()))

    @property
    def single(self) -> bool | None:
        """The expert when there is one group (the fast path), else None."""
        return self.groups[0][2] if len(self.groups) == 1 else None


def _linear_into(out: Tensor, x: Tensor, layer: nn.Linear) -> None:
    """out = layer(x), written into a slice of a preallocated buffer (no concatenation)."""
    if layer.bias is not None:
        torch.addmm(layer.bias, x, layer.weight.t(), out=out)
    else:
        torch.mm(x, layer.weight.t(), out=out)


def group_linear(x: Tensor, rows: RowGroups, und: nn.Linear, gen: nn.Linear) -> Tensor:
    """Each row group through its expert's linear, one product per group."""
    single = rows.single
    if single is not None:
        return gen(x) if single else und(x)
    out = x.new_empty(x.shape[0], und.out_features)
    for start, end, is_gen in rows.groups:
        _linear_into(out[start:end], x[start:end], gen if is_gen else und)
    return out


def group_apply(x: Tensor, rows: RowGroups, und: Callable[[Tensor], Tensor], gen: Callable[[Tensor], Tensor]) -> Tensor:
    """A row-wise function (norm, MLP) per group; the results are placed in one buffer."""
    single = rows.single
    if single is not None:
        return gen(x) if single else und(x)
    out: Tensor | None = None
    for start, end, is_gen in rows.groups:
        y = (gen if is_gen else und)(x[start:end])
        if out is None:
            out = y.new_empty((x.shape[0], *y.shape[1:]))
        out[start:end] = y
    assert out is not None
    return out


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rope_angles(cfg: LLMConfig, positions: Tensor) -> Tensor:
    """[T, head_dim] float32 angles (Qwen2: inv_freq from int64 arange, then position * inv_freq)."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=positions.device).float() / d))
    angles = positions.float()[:, None] * inv_freq[None]  # [T, d/2]
    return torch.cat([angles, angles], dim=-1)


def rope_tables(cfg: LLMConfig, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin [T, 1, head_dim] for 1-D positions: float32, then cast to the layer input dtype (as Qwen2)."""
    emb = rope_angles(cfg, positions)[:, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


class RopeTable:
    """cos and sin for every RoPE position, built once on the CPU in float32 (as the official code computes
    them) and moved to the device in the layer dtype; a forward only indexes it. `sin_signed` folds
    `rotate_half`'s sign in, so q * cos + roll(q, D/2) * sin_signed equals Qwen2's rotation exactly."""

    def __init__(self, cfg: LLMConfig, device: torch.device, dtype: torch.dtype, positions: int | None = None):
        n = positions or cfg.max_position_embeddings
        cos, sin = rope_tables(cfg, torch.arange(n), dtype)
        half = cfg.head_dim // 2
        signed = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        self.size = n
        self.cos, self.sin, self.sin_signed = cos.to(device), sin.to(device), signed.to(device)

    def __call__(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """(cos, sin) [T, 1, head_dim] for the positions (a device tensor)."""
        return self.cos[positions], self.sin[positions]


def apply_rope(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """Qwen2's rotation with one roll instead of two slices, a negation and a concatenation."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin_signed


class MLP(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up: Tensor | None = None  # [2 * intermediate, hidden] after fuse_projections

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))

    def forward_bf16(self, x: Tensor) -> Tensor:
        """The MLP on bfloat16 activations (every intermediate rounded), as official gen mode runs it."""
        r = bf16_round
        return r(self.down_proj(r(r(nn.functional.silu(r(self.gate_proj(x)))) * r(self.up_proj(x)))))

    def forward_fused(self, x: Tensor) -> Tensor:
        assert self.gate_up is not None
        gate, up = torch.mm(self.gate_up, x.t()).chunk(2)  # [intermediate, rows] each: see `rows_linear`
        return torch.mm(self.down_proj.weight, F.silu(gate) * up).t()


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.eps = cfg.rms_norm_eps
        h, q, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.kv_dim
        for suffix in ("", "_moe_gen"):
            setattr(self, "q_proj" + suffix, nn.Linear(h, q, bias=True))
            setattr(self, "k_proj" + suffix, nn.Linear(h, kv, bias=True))
            setattr(self, "v_proj" + suffix, nn.Linear(h, kv, bias=True))
            setattr(self, "o_proj" + suffix, nn.Linear(q, h, bias=False))
            setattr(self, "q_norm" + suffix, RMSNorm(cfg.head_dim, cfg.rms_norm_eps))
            setattr(self, "k_norm" + suffix, RMSNorm(cfg.head_dim, cfg.rms_norm_eps))
        # Set by fuse_projections: the understanding expert's q/k/v weight and bias in one buffer, and the
        # q and k norm weights side by side ([H + Hkv, D]) for the decode step.
        self.qkv_weight: Tensor | None = None
        self.qkv_bias: Tensor | None = None
        self.qkv_bias_col: Tensor | None = None  # the same, as a column [out, 1] (decode: weight @ x^T + bias)
        self.qk_norm_weight: Tensor | None = None

    def forward(
        self,
        x: Tensor,
        rows: RowGroups,
        gen_mode: bool,
        rope: tuple[Tensor, Tensor],
        kv: tuple[Tensor, Tensor],
        slots: Tensor,
        meta: AttnMeta,
        backend: SdpaBackend,
    ) -> Tensor:
        t = x.shape[0]
        if gen_mode:
            x = bf16_round(x)
        q = group_linear(x, rows, self.q_proj, self.q_proj_moe_gen).view(t, self.heads, self.head_dim)
        k = group_linear(x, rows, self.k_proj, self.k_proj_moe_gen).view(t, self.kv_heads, self.head_dim)
        v = group_linear(x, rows, self.v_proj, self.v_proj_moe_gen).view(t, self.kv_heads, self.head_dim)
        if gen_mode:  # bf16 projections, then float32 q/k norm and RoPE
            q, k, v = bf16_round(q).float(), bf16_round(k).float(), bf16_round(v)
        q = group_apply(q, rows, self.q_norm, self.q_norm_moe_gen)
        k = group_apply(k, rows, self.k_norm, self.k_norm_moe_gen)
        cos, sin = rope
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k_pool, v_pool = kv
        flat_k, flat_v = k_pool.view(-1, self.kv_heads, self.head_dim), v_pool.view(-1, self.kv_heads, self.head_dim)
        flat_k.index_copy_(0, slots, bf16_round(k).to(k_pool.dtype))
        flat_v.index_copy_(0, slots, bf16_round(v).to(v_pool.dtype))
        out = backend.packed(bf16_round(q).to(k_pool.dtype), k_pool, v_pool, meta)  # [T, H, D]
        out = bf16_round(out).to(x.dtype).reshape(t, self.heads * self.head_dim)
        return bf16_round(group_linear(out, rows, self.o_proj, self.o_proj_moe_gen))

    def decode(
        self,
        x: Tensor,
        cos: Tensor,
        sin_signed: Tensor,
        flat_k: Tensor,
        flat_v: Tensor,
        buf: DecodeBuffers,
        backend: SdpaBackend,
    ) -> Tensor:
        """The understanding expert over B decode rows (one token each); the same numerics as `forward`."""
        assert self.qkv_weight is not None and self.qk_norm_weight is not None
        b, h, hkv = x.shape[0], self.heads, self.kv_heads
        qkv = rows_linear(x, self.qkv_weight, self.qkv_bias_col).reshape(b, h + 2 * hkv, self.head_dim)
        qk = rms_norm(qkv[:, : h + hkv], None, self.eps) * self.qk_norm_weight
        qk = apply_rope(qk, cos, sin_signed)
        flat_k.index_copy_(0, buf.slots, cast(bf16_round(qk[:, h:]), flat_k.dtype))
        flat_v.index_copy_(0, buf.slots, cast(bf16_round(qkv[:, h + hkv :]), flat_v.dtype))
        out = backend.decode(cast(bf16_round(qk[:, :h]), flat_k.dtype), flat_k, flat_v, buf)
        out = cast(bf16_round(out), x.dtype).reshape(b, h * self.head_dim)
        return bf16_round(rows_linear(out, self.o_proj.weight))


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

    def forward(
        self,
        x: Tensor,
        rows: RowGroups,
        gen_mode: bool,
        rope: tuple[Tensor, Tensor],
        kv: tuple[Tensor, Tensor],
        slots: Tensor,
        meta: AttnMeta,
        backend: SdpaBackend,
    ) -> Tensor:
        a = group_apply(x, rows, self.input_layernorm, self.input_layernorm_moe_gen)
        h = x + self.self_attn(a, rows, gen_mode, rope, kv, slots, meta, backend)
        m = group_apply(h, rows, self.post_attention_layernorm, self.post_attention_layernorm_moe_gen)
        if gen_mode:
            m = group_apply(bf16_round(m), rows, self.mlp.forward_bf16, self.mlp_moe_gen.forward_bf16)
        else:
            m = group_apply(m, rows, self.mlp, self.mlp_moe_gen)
        return h + m

    def decode(
        self,
        x: Tensor,
        cos: Tensor,
        sin_signed: Tensor,
        flat_k: Tensor,
        flat_v: Tensor,
        buf: DecodeBuffers,
        backend: SdpaBackend,
    ) -> Tensor:
        a = self.input_layernorm(x)
        h = x + self.self_attn.decode(a, cos, sin_signed, flat_k, flat_v, buf, backend)
        return h + self.mlp.forward_fused(self.post_attention_layernorm(h))


class Qwen2Model(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.embed_tokens = table_embedding(cfg.vocab_size, cfg.hidden_size)
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

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        rows: RowGroups,
        gen_mode: bool,
        kv: list[tuple[Tensor, Tensor]],
        slots: Tensor,
        meta: AttnMeta,
        backend: SdpaBackend,
        final_norm: bool = True,
    ) -> Tensor:
        """x [T, hidden] -> hidden states [T, hidden] (final-normed unless `final_norm` is False); writes
        K/V of every row at `slots`. `rope` is (cos, sin) [T, 1, head_dim] for the rows' positions."""
        for layer, layer_kv in zip(self.model.layers, kv):
            x = layer(x, rows, gen_mode, rope, layer_kv, slots, meta, backend)
        return self.final_norm(x, rows) if final_norm else x

    def final_norm(self, x: Tensor, rows: RowGroups) -> Tensor:
        return group_apply(x, rows, self.model.norm, self.model.norm_moe_gen)

    def decode_step(
        self, buf: DecodeBuffers, rope: RopeTable, flat_kv: list[tuple[Tensor, Tensor]], backend: SdpaBackend
    ) -> Tensor:
        """Logits [B, vocab] for the decode rows in `buf` (writes each row's K/V at its slot).

        A pure function of the buffers and the weights: nothing in it depends on a Python value that changes
        from token to token, so it can be captured once per batch size and replayed."""
        x = self.model.embed_tokens(buf.tokens)
        cos, sin_signed = rope.cos[buf.positions], rope.sin_signed[buf.positions]
        for layer, (flat_k, flat_v) in zip(self.model.layers, flat_kv):
            x = layer.decode(x, cos, sin_signed, flat_k, flat_v, buf, backend)
        return rows_linear(self.model.norm(x), self.lm_head.weight)


def fuse_projections(lm: LanguageModel) -> None:
    """Put each layer's understanding-expert q/k/v (weights and biases) and gate/up weights into one buffer
    and re-point the original parameters at views of it: one product instead of three (two), no extra
    memory. Idempotent."""
    with torch.no_grad():
        for layer in lm.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if attn.qkv_weight is None:
                projs = (attn.q_proj, attn.k_proj, attn.v_proj)
                attn.qkv_weight = _fuse([p.weight for p in projs], projs, "weight")
                attn.qkv_bias = _fuse([p.bias for p in projs], projs, "bias")
                attn.qkv_bias_col = attn.qkv_bias[:, None]
                attn.qk_norm_weight = torch.cat(
                    [attn.q_norm.weight.expand(attn.heads, -1), attn.k_norm.weight.expand(attn.kv_heads, -1)]
                )
            if mlp.gate_up is None:
                projs = (mlp.gate_proj, mlp.up_proj)
                mlp.gate_up = _fuse([p.weight for p in projs], projs, "weight")


def _fuse(parts: list[Tensor], owners: tuple[nn.Linear, ...], name: str) -> Tensor:
    fused = torch.cat(parts)
    offset = 0
    for part, owner in zip(parts, owners):
        n = part.shape[0]
        setattr(owner, name, nn.Parameter(fused[offset : offset + n], requires_grad=False))
        offset += n
    return fused
