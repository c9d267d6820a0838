"""torch-fidelity's InceptionV3 (torchmetrics' ``NoTrainInceptionV3``) from a local file."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import NoTrainInceptionV3

from gigagan_train.errors import RunError
from gigagan_train.spec import INCEPTION_HINT, check_weights_file

__all__ = ["RESIZE", "inception_features", "load_inception", "to_uint8"]

RESIZE = "torchmetrics-bilinear-antialias-299"
"""The resize of torchmetrics' NoTrainInceptionV3 (antialiased bilinear to 299 px); part of
the real-feature cache key, since another resize gives other features."""


def load_inception(
    path: str | Path, features: int = 2048, device: str | torch.device = "cpu"
) -> nn.Module:
    """torch-fidelity's InceptionV3 (torchmetrics' ``NoTrainInceptionV3``) with the weights
    of the local file ``path``, returning the ``features``-wide layer (64, 192, 768, 2048).

    The file is first read with ``torch.load(weights_only=True)``: only a plain state dict
    of tensors gets as far as torch-fidelity's own loader. A missing file, one that holds
    anything else, or one that does not fit the network is a :class:`RunError` in one line.
    """
    named = None if path is None else str(path)
    file = check_weights_file(named, "--inception-weights", INCEPTION_HINT)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RunError(
            f"--inception-weights {file}: not a PyTorch state dict of tensors ({first}); it "
            f"should be {INCEPTION_HINT}"
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise RunError(
            f"--inception-weights {file}: not a state dict; it should be {INCEPTION_HINT}"
        )
    del state
    try:
        net = NoTrainInceptionV3("inception-v3-compat", [str(features)], str(file))
    except RuntimeError as exc:  # load_state_dict: missing / unexpected / mis-shaped keys
        first = str(exc).strip().splitlines()[0]
        raise RunError(
            f"--inception-weights {file}: does not fit torch-fidelity's InceptionV3 ({first})"
        ) from exc
    return net.to(device).eval().requires_grad_(False)


def to_uint8(images: Tensor) -> Tensor:
    """``b 3 h w`` in [-1, 1] to uint8 in [0, 255], as images are stored and as the
    Inception network expects them."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@torch.no_grad()
def inception_features(extractor: nn.Module, images: Tensor) -> Tensor:
    """Features ``b d`` (float32, on CPU) of images ``b 3 h w`` in [-1, 1] at any size."""
    device = next(extractor.parameters()).device
    return extractor(to_uint8(images).to(device)).float().cpu()
