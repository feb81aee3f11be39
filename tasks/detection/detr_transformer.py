"""DETR's encoder-decoder transformer and sine positions (Carion et al., ECCV 2020, Sec. 3.2 and Fig. 10).

The official code's architecture (facebookresearch/detr ``models/transformer.py``, ``position_encoding.py``),
with its module names, so that an official checkpoint loads key for key:

* post-norm layers (the official default, ``pre_norm=False``): attention / FFN, dropout, residual, LayerNorm;
* the positions are added to the queries and keys of every attention, at every layer, never to the values
  (Fig. 10); the object queries (``query_pos``) likewise in the decoder, whose input starts at zero;
* no LayerNorm after the encoder (the official code removes ``torch.nn.Transformer``'s), one after the
  decoder, applied to every layer's output (the auxiliary losses read them);
* every weight matrix of the transformer initialised by Xavier-uniform (``Transformer._reset_parameters``).

Sequences are ``(tokens, batch, channels)`` as in the official code and ``nn.MultiheadAttention``'s default.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn


class SinePositionEncoding(nn.Module):
    """The 2-D sine positions of ``PositionEmbeddingSine(hidden_dim // 2, normalize=True)``: for each pixel not
    padded, its row and column counted from 1 over the unpadded extent, scaled to (0, 2 pi], each encoded by
    ``num_feats`` sines and cosines of wavelengths ``temperature ** (2 i / num_feats)``; (y, x) concatenated.
    ``offset``: subtracted from the counts first (Deformable DETR's encoding: 0.5, the pixel centres)."""

    def __init__(self, num_feats: int = 128, temperature: float = 10000.0, offset: float = 0.0):
        super().__init__()
        self.num_feats, self.temperature, self.offset = num_feats, temperature, offset

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """``mask``: ``(N, H, W)``, True on padding. Returns ``(N, 2 * num_feats, H, W)`` float32."""
        not_mask = ~mask
        y = not_mask.cumsum(1, dtype=torch.float32)
        x = not_mask.cumsum(2, dtype=torch.float32)
        eps, scale = 1e-6, 2 * math.pi
        y = (y - self.offset) / (y[:, -1:, :] + eps) * scale
        x = (x - self.offset) / (x[:, :, -1:] + eps) * scale
        dim_t = torch.arange(self.num_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_feats)
        pos_x, pos_y = x[..., None] / dim_t, y[..., None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def _attend(attention: nn.MultiheadAttention, query, key, value, key_padding_mask=None) -> torch.Tensor:
    # need_weights=False: the fused kernel; the official code averages weights it never reads
    return attention(query, key, value, key_padding_mask=key_padding_mask, need_weights=False)[0]


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, src: torch.Tensor, padding_mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        q = k = src + pos
        src = self.norm1(src + self.dropout1(_attend(self.self_attn, q, k, src, padding_mask)))
        return self.norm2(src + self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(src))))))


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.dropout1, self.dropout2, self.dropout3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, memory_padding_mask: torch.Tensor, pos: torch.Tensor,
                query_pos: torch.Tensor) -> torch.Tensor:
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout1(_attend(self.self_attn, q, k, tgt)))
        attended = _attend(self.multihead_attn, tgt + query_pos, memory + pos, memory, memory_padding_mask)
        tgt = self.norm2(tgt + self.dropout2(attended))
        return self.norm3(tgt + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(tgt))))))


class Encoder(nn.Module):
    def __init__(self, layer: EncoderLayer, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))

    def forward(self, src: torch.Tensor, padding_mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            src = layer(src, padding_mask, pos)
        return src


class Decoder(nn.Module):
    def __init__(self, layer: DecoderLayer, num_layers: int, d_model: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, memory_padding_mask: torch.Tensor, pos: torch.Tensor,
                query_pos: torch.Tensor) -> torch.Tensor:
        """Every layer's output through the final norm, stacked: ``(layers, queries, batch, channels)``."""
        outputs = []
        for layer in self.layers:
            tgt = layer(tgt, memory, memory_padding_mask, pos, query_pos)
            outputs.append(self.norm(tgt))
        return torch.stack(outputs)


class DETRTransformer(nn.Module):
    """Encoder over the projected C5 map, decoder from the object queries (``models/transformer.py``'s
    ``Transformer`` with ``return_intermediate_dec=True``)."""

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6, num_decoder_layers: int = 6,
                 dim_feedforward: int = 2048, dropout: float = 0.1):
        super().__init__()
        self.encoder = Encoder(EncoderLayer(d_model, nhead, dim_feedforward, dropout), num_encoder_layers)
        self.decoder = Decoder(DecoderLayer(d_model, nhead, dim_feedforward, dropout), num_decoder_layers, d_model)
        self.d_model = d_model
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src: torch.Tensor, mask: torch.Tensor, query_embed: torch.Tensor,
                pos: torch.Tensor) -> torch.Tensor:
        """``src`` ``(N, C, H, W)``, ``mask`` ``(N, H, W)`` True on padding, ``query_embed`` ``(Q, C)``, ``pos`` like
        ``src``. Returns the decoder's outputs ``(layers, N, Q, C)``."""
        n = src.shape[0]
        src = src.flatten(2).permute(2, 0, 1)
        pos = pos.flatten(2).permute(2, 0, 1)
        query_pos = query_embed.unsqueeze(1).repeat(1, n, 1)
        mask = mask.flatten(1)
        memory = self.encoder(src, mask, pos)
        hs = self.decoder(torch.zeros_like(query_pos), memory, mask, pos, query_pos)
        return hs.transpose(1, 2)
