"""Networks F(c_in x, c_noise): an MLP for vector data and a compact U-Net for images (8x8 up to 64x64).

Both embed the noise level c_noise (positional as EDM's DDPM++, which suits VP's 999 t and EDM's ln(sigma)/4,
or random Fourier features as NCSN++), add it to every block, and zero-initialise their output layer so a
fresh denoiser starts as D = c_skip x.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class NoiseEmbedding(nn.Module):
    """Sinusoidal features of the scalar noise level (positional or random Fourier), then a 2-layer MLP."""

    def __init__(
        self, dim: int, kind: str = "positional", max_positions: int = 10000, scale: float = 16.0
    ) -> None:
        super().__init__()
        if kind == "positional":
            freqs = (1 / max_positions) ** (torch.arange(dim // 2, dtype=torch.float32) / (dim // 2))
        elif kind == "fourier":
            freqs = 2 * math.pi * torch.randn(dim // 2) * scale
        else:
            raise ValueError(f"embedding: expected positional|fourier (got {kind!r})")
        self.register_buffer("freqs", freqs)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, c_noise: Tensor) -> Tensor:
        phase = c_noise.reshape(-1, 1).to(torch.float32) * self.freqs
        return self.mlp(torch.cat([phase.cos(), phase.sin()], dim=1))


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def _config(kind: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """A network's `config`: its kind and constructor arguments (its `locals()` before it assigns any other,
    sequences as lists), stored next to its weights so that `build_network` rebuilds it."""
    args = {k: v for k, v in arguments.items() if k not in ("self", "__class__")}
    return {"kind": kind, **{k: list(v) if isinstance(v, (list, tuple)) else v for k, v in args.items()}}


class MLP(nn.Module):
    """Residual MLP for D-dimensional data (2-D toy sets), the noise level entering as scale and shift.
    The data's dimension `dim` is positional; the sizes are named."""

    def __init__(
        self,
        dim: int = 2,
        *,
        hidden: int = 128,
        depth: int = 3,
        emb_dim: int = 64,
        embedding: str = "positional",
    ) -> None:
        super().__init__()
        self.config = _config("mlp", locals())
        self.embed = NoiseEmbedding(emb_dim, embedding)
        self.inp = nn.Linear(dim, hidden)
        # Scale-and-shift (FiLM) lets the net divide by sigma: VE and FDM inputs span orders of magnitude.
        self.film = nn.ModuleList(nn.Linear(emb_dim, 2 * hidden) for _ in range(depth + 1))
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(depth))
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.out = _zero(nn.Linear(hidden, dim))

    def forward(self, x: Tensor, c_noise: Tensor) -> Tensor:
        emb = self.embed(c_noise)
        h = self.inp(x)
        for film, norm, block in zip(self.film, self.norms, self.blocks):
            scale, shift = film(emb).chunk(2, dim=1)
            h = h + block(F.silu(norm(h) * (1 + scale) + shift))
        scale, shift = self.film[-1](emb).chunk(2, dim=1)
        return self.out(F.silu(h * (1 + scale) + shift))


def _groups(channels: int) -> int:
    return next(g for g in (32, 16, 8, 4, 2, 1) if (channels % g == 0 and channels // g >= 2) or g == 1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the noise embedding as a per-channel scale and shift."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(self.norm2(h) * (1 + scale) + shift)
        return self.skip(x) + self.conv2(self.dropout(h))


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)


class UNet(nn.Module):
    """Compact U-Net: `channel_mult` levels of `num_blocks` ResBlocks, attention at `attn_resolutions`."""

    def __init__(
        self,
        img_resolution: int = 8,
        in_channels: int = 1,
        model_channels: int = 32,
        channel_mult: Sequence[int] = (1, 2),
        num_blocks: int = 2,
        attn_resolutions: Sequence[int] = (4,),
        dropout: float = 0.0,
        emb_dim: int | None = None,
        embedding: str = "positional",
    ) -> None:
        super().__init__()
        if img_resolution % 2 ** (len(channel_mult) - 1):
            raise ValueError(
                f"img_resolution: {img_resolution} is not divisible by 2^{len(channel_mult) - 1} "
                f"(one halving per channel_mult level)"
            )
        emb_dim = emb_dim or 4 * model_channels
        self.config = _config("unet", locals())
        self.embed = NoiseEmbedding(emb_dim, embedding)
        self.inp = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skips = [model_channels]
        ch, res = model_channels, img_resolution
        for level, mult in enumerate(channel_mult):
            for _ in range(num_blocks):
                self.down.append(
                    self._block(ch, model_channels * mult, emb_dim, dropout, res in attn_resolutions)
                )
                ch = model_channels * mult
                skips.append(ch)
            if level < len(channel_mult) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
                res //= 2
        self.mid = nn.ModuleList(
            [self._block(ch, ch, emb_dim, dropout, True), self._block(ch, ch, emb_dim, dropout, False)]
        )
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_blocks + 1):
                cout = model_channels * mult
                self.up.append(self._block(ch + skips.pop(), cout, emb_dim, dropout, res in attn_resolutions))
                ch = cout
            if level > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
                res *= 2
        self.out = nn.Sequential(
            nn.GroupNorm(_groups(ch), ch), nn.SiLU(), _zero(nn.Conv2d(ch, in_channels, 3, padding=1))
        )

    @staticmethod
    def _block(cin: int, cout: int, emb_dim: int, dropout: float, attn: bool) -> nn.ModuleList:
        layers: list[nn.Module] = [ResBlock(cin, cout, emb_dim, dropout)]
        if attn:
            layers.append(AttnBlock(cout))
        return nn.ModuleList(layers)

    @staticmethod
    def _run(layer: nn.Module, h: Tensor, emb: Tensor) -> Tensor:
        if isinstance(layer, nn.ModuleList):
            h = layer[0](h, emb)
            for extra in layer[1:]:
                h = extra(h)
            return h
        return layer(h)

    def forward(self, x: Tensor, c_noise: Tensor) -> Tensor:
        emb = self.embed(c_noise)
        h = self.inp(x)
        hs = [h]
        for layer in self.down:
            h = self._run(layer, h, emb)
            hs.append(h)
        for layer in self.mid:
            h = self._run(layer, h, emb)
        for layer in self.up:
            if isinstance(layer, nn.ModuleList):
                h = torch.cat([h, hs.pop()], dim=1)
            h = self._run(layer, h, emb)
        return self.out(h)


def build_network(config: dict) -> nn.Module:
    """Rebuild a network from its `config` dict (as stored next to its weights)."""
    cfg = dict(config)
    kind = cfg.pop("kind")
    if kind == "mlp":
        return MLP(**cfg)
    if kind == "unet":
        return UNet(**cfg)
    raise ValueError(f"model.kind: expected mlp|unet (got {kind!r})")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_summary(model: nn.Module) -> str:
    """One line per top-level submodule with its parameter count, then the total."""
    lines = [f"{type(model).__name__}"]
    for name, child in model.named_children():
        lines.append(f"  {name:<10} {type(child).__name__:<18} {count_parameters(child):>12,d}")
    lines.append(f"  {'total':<29} {count_parameters(model):>12,d} parameters")
    return "\n".join(lines)
