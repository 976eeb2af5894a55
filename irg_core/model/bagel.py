"""The BAGEL model: the MoT language model plus the modules that turn images into LLM rows and back.

Attribute names equal the keys of `ema.safetensors`, so loading needs no renaming.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from irg_core.config import BagelConfig
from irg_core.model.embed import MLPConnector, PositionEmbedding, TimestepEmbedder
from irg_core.model.qwen2_mot import LanguageModel
from irg_core.model.vit import SiglipVisionModel


class Bagel(nn.Module):
    def __init__(self, cfg: BagelConfig):
        super().__init__()
        self.cfg = cfg
        hidden = cfg.llm.hidden_size
        self.language_model = LanguageModel(cfg.llm)
        self.time_embedder = TimestepEmbedder(hidden, cfg.timestep_embed_dim)
        self.vae2llm = nn.Linear(cfg.patch_latent_dim, hidden)
        self.llm2vae = nn.Linear(hidden, cfg.patch_latent_dim)
        self.latent_pos_embed = PositionEmbedding(cfg.max_latent_size, hidden)
        self.vit_model = SiglipVisionModel(cfg.vit)
        self.connector = MLPConnector(cfg.vit.hidden_size, hidden)
        self.vit_pos_embed = PositionEmbedding(cfg.vit_max_num_patch_per_side, hidden)

    @property
    def dtype(self) -> torch.dtype:
        return self.vae2llm.weight.dtype

    def embed_tokens(self, ids: Tensor) -> Tensor:
        return self.language_model.model.embed_tokens(ids)

    def latent_rows(self, latents: Tensor, t: Tensor, position_ids: Tensor) -> Tensor:
        """LLM rows of latent tokens [N, 64] at timestep t (0-dim, in [0, 1]): (vae2llm + temb) + pos."""
        temb = self.time_embedder(t.reshape(1))  # [1, hidden], broadcast to every token
        return self.vae2llm(latents.to(self.dtype)) + temb + self.latent_pos_embed(position_ids)

    def vit_rows(self, patches: Tensor, position_ids: Tensor) -> Tensor:
        """LLM rows of one image's ViT patches: SigLIP -> connector -> + 2-D sin-cos position."""
        features = self.vit_model(patches.to(self.dtype), position_ids)
        return self.connector(features) + self.vit_pos_embed(position_ids)

    def velocity(self, hidden: Tensor) -> Tensor:
        return self.llm2vae(hidden)

    def logits(self, hidden: Tensor) -> Tensor:
        return self.language_model.lm_head(hidden)
