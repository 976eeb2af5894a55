"""SigLIP NaViT encoder as BAGEL uses it: linear patch embedding, learned positions, pre-LN layers.

The checkpoint stores the patch convolution already converted to a Linear over (py, px, c)-ordered
patches. BAGEL builds `num_hidden_layers - 1` layers and keeps `post_layernorm`; there is no pooling head.
Attention is bidirectional within one image; q/k/v enter it as bfloat16 and its output projection writes
bfloat16 (the flash-attn path of the official code).
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from irg_core.config import ViTConfig
from irg_core.model.embed import table_embedding
from irg_core.model.qwen2_mot import bf16_round


class SiglipAttention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        d = cfg.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        q, k, v = (
            bf16_round(p(x)).view(n, self.heads, self.head_dim).transpose(0, 1)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )  # [H, N, D]
        o = F.scaled_dot_product_attention(q[None], k[None], v[None])[0]
        o = bf16_round(o).transpose(0, 1).reshape(n, -1)
        return bf16_round(self.out_proj(o))


class SiglipMLP(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.patch_embedding = nn.Linear(cfg.num_channels * cfg.patch_size**2, cfg.hidden_size)
        self.position_embedding = table_embedding(cfg.num_positions, cfg.hidden_size)


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(cfg) for _ in range(cfg.layers))


class SiglipVisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class SiglipVisionModel(nn.Module):
    """`vit_model` in the checkpoint."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.vision_model = SiglipVisionTransformer(cfg)

    def forward(self, patches: Tensor, position_ids: Tensor) -> Tensor:
        """patches [N, 3*p*p] of one image in [-1, 1], position ids [N] -> [N, hidden] (post-LN)."""
        vm = self.vision_model
        x = vm.embeddings.patch_embedding(patches) + vm.embeddings.position_embedding(position_ids)
        for layer in vm.encoder.layers:
            x = layer(x)
        return vm.post_layernorm(x)
