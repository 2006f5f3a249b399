"""Fixed 2-D sine position encoding over the unpadded region (normalised coordinates).

The two official codebases differ by half a cell: DETR normalises the cumulative count
``y / y_max`` (facebookresearch/detr ``position_encoding.py``), Deformable DETR and its forks
``(y - 0.5) / y_max``. ``offset`` selects which, so released weights of either see the
encoding they were trained with.
"""
import math

import torch
from torch import Tensor, nn


class PositionEmbeddingSine(nn.Module):
    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0,
                 normalize: bool = True, scale: float = 2 * math.pi, offset: float = 0.0):
        super().__init__()
        self.num_pos_feats, self.temperature = num_pos_feats, temperature
        self.normalize, self.scale, self.offset = normalize, scale, offset

    def forward(self, mask: Tensor) -> Tensor:
        """mask [B,H,W] (True = padding) -> pos [B, 2*num_pos_feats, H, W]."""
        not_mask = (~mask).float()
        y = not_mask.cumsum(1)
        x = not_mask.cumsum(2)
        if self.normalize:
            eps = 1e-6
            y = (y + self.offset) / (y[:, -1:, :] + eps) * self.scale
            x = (x + self.offset) / (x[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)
        px = x[..., None] / dim_t
        py = y[..., None] / dim_t
        px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
        py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((py, px), dim=3).permute(0, 3, 1, 2)
