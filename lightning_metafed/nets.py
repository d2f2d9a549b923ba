"""Small networks for the built-in configs (and as templates for your own)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from lightning_metafed._validation import check_int

__all__ = ["MLP", "ConvNet"]

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


class MLP(nn.Sequential):
    """``in_features → hidden[0] → … → out_features`` with an activation between layers.

    Args:
        in_features: the input size.
        hidden: the hidden layers' sizes (``None``: ``[40, 40]``).
        out_features: the output size.
        activation: the activation between layers, ``"relu"``, ``"tanh"`` or ``"gelu"``.
    """

    def __init__(
        self,
        in_features: int = 1,
        hidden: list[int] | None = None,
        out_features: int = 1,
        activation: Literal["relu", "tanh", "gelu"] = "relu",
    ):
        hidden = [40, 40] if hidden is None else list(hidden)
        if activation not in _ACTIVATIONS:
            raise ValueError(f"Expected `activation` in {sorted(_ACTIVATIONS)}, got {activation!r}")
        for name, value in (("in_features", in_features), ("out_features", out_features), *(("hidden", h) for h in hidden)):
            check_int(name, value, minimum=1)
        sizes = [in_features, *hidden, out_features]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(_ACTIVATIONS[activation]())
        super().__init__(*layers)


class ConvNet(nn.Module):
    """A small conv net for ``[C, H, W]`` images: ``blocks`` × (3×3 conv → GroupNorm → ReLU), global
    average pooling, linear head. GroupNorm (no running statistics) keeps clients independent and
    lets ``torch.func.vmap`` vectorize them.

    Args:
        in_channels: ``C``, the input images' channels.
        num_classes: the output size of the linear head.
        channels: the channels of every conv block (divisible by ``groups``).
        blocks: how many conv blocks.
        groups: the GroupNorm groups per block.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, channels: int = 32, blocks: int = 2, groups: int = 4):
        super().__init__()
        if channels % groups:
            raise ValueError(f"Expected `channels` ({channels}) to be divisible by `groups`, got groups={groups}")
        layers: list[nn.Module] = []
        c = in_channels
        for _ in range(blocks):
            layers += [nn.Conv2d(c, channels, 3, padding=1), nn.GroupNorm(groups, channels), nn.ReLU()]
            c = channels
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(-2, -1)))
