"""Mapping network ``w = M(z, t_global)`` with a tracked ``w_avg`` (GigaGAN Sec. 3.2)."""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor, nn

from gigagan_core.errors import InputError
from gigagan_core.layers.equalized import EqualizedLinear

__all__ = ["MappingNetwork", "normalize_2nd_moment", "truncate"]


def normalize_2nd_moment(x: Tensor, dim: int = 1, eps: float = 1e-8) -> Tensor:
    """Scale ``x`` to unit root-mean-square along ``dim``."""
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


def truncate(w: Tensor, w_avg: Tensor, psi: float | Tensor) -> Tensor:
    """The truncation trick: ``w_avg + psi (w - w_avg)``; ``psi=1`` is the identity.

    ``w``: ``b w_dim`` or ``b num_ws w_dim``; ``psi``: a number or one value per sample
    (``b``).
    """
    if isinstance(psi, (int, float)):
        if not math.isfinite(psi):
            raise InputError(f"psi (the truncation) must be a finite number, got {psi}")
        if psi == 1:
            return w
    else:
        psi = torch.as_tensor(psi, dtype=w.dtype, device=w.device)
        if not bool(torch.isfinite(psi).all()):
            raise InputError("psi (the truncation) holds NaN or infinite values")
        if psi.ndim == 1:
            if psi.shape[0] != w.shape[0]:
                raise InputError(f"psi has {psi.shape[0]} values for a batch of {w.shape[0]}")
            psi = psi.reshape(-1, *([1] * (w.ndim - 1)))
    return torch.lerp(w_avg.to(w.dtype), w, psi)


class MappingNetwork(nn.Module):
    """``w = MLP([norm(z), norm(embed(t_global))])``: StyleGAN2's mapping network with text.

    GigaGAN concatenates the latent ``z ~ N(0, I)`` with the global text feature ``t_global``
    and maps them through an MLP with equalised learning rate (``lr_multiplier`` 0.01 as in
    StyleGAN2). Both inputs are normalised to unit second moment so neither dominates by
    scale. ``c_dim=0`` gives the unconditional network.

    ``w_avg`` (buffer, ``w_dim``) is an exponential moving average of the produced ``w``,
    updated when ``update_w_avg`` is true; truncation pulls ``w`` towards it.

    Shapes: ``z: b z_dim``, ``c: b c_dim`` to ``w: b w_dim``.
    """

    def __init__(
        self,
        z_dim: int,
        c_dim: int,
        w_dim: int,
        num_layers: int = 4,
        hidden_dim: int | None = None,
        lr_multiplier: float = 0.01,
        w_avg_beta: float = 0.995,
    ) -> None:
        super().__init__()
        if z_dim < 1 or w_dim < 1 or c_dim < 0:
            raise InputError(
                f"need z_dim >= 1, w_dim >= 1, c_dim >= 0; got {z_dim}, {w_dim}, {c_dim}"
            )
        if num_layers < 1:
            raise InputError(f"num_layers must be at least 1, got {num_layers}")
        self.z_dim, self.c_dim, self.w_dim = z_dim, c_dim, w_dim
        self.num_layers = num_layers
        self.w_avg_beta = w_avg_beta
        hidden = hidden_dim or w_dim
        self.embed = EqualizedLinear(c_dim, w_dim) if c_dim > 0 else None
        features = [z_dim + (w_dim if c_dim > 0 else 0)] + [hidden] * (num_layers - 1) + [w_dim]
        self.layers = nn.ModuleList(
            EqualizedLinear(i, o, activation="lrelu", lr_multiplier=lr_multiplier)
            for i, o in itertools.pairwise(features)
        )
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(
        self,
        z: Tensor,
        c: Tensor | None = None,
        *,
        psi: float | Tensor = 1.0,
        update_w_avg: bool = False,
    ) -> Tensor:
        if z.ndim != 2 or z.shape[1] != self.z_dim:
            raise InputError(f"z must have shape (b, {self.z_dim}), got {tuple(z.shape)}")
        # The network computes in its own precision, whatever z was drawn in.
        x = normalize_2nd_moment(z.to(self.w_avg.dtype))
        if self.embed is not None:
            if c is None:
                raise InputError("this mapping network is text-conditional; pass t_global")
            if c.shape != (z.shape[0], self.c_dim):
                raise InputError(
                    f"t_global must have shape ({z.shape[0]}, {self.c_dim}), got {tuple(c.shape)}"
                )
            x = torch.cat([x, normalize_2nd_moment(self.embed(c.to(x.dtype)))], dim=1)
        elif c is not None:
            raise InputError("this mapping network is unconditional; got a text input")
        for layer in self.layers:
            x = layer(x)
        if update_w_avg:
            with torch.no_grad():
                self.w_avg.lerp_(x.detach().mean(0).to(self.w_avg.dtype), 1.0 - self.w_avg_beta)
        return truncate(x, self.w_avg, psi)

    def extra_repr(self) -> str:
        return (
            f"z_dim={self.z_dim}, c_dim={self.c_dim}, w_dim={self.w_dim}, "
            f"num_layers={self.num_layers}, w_avg_beta={self.w_avg_beta}"
        )
