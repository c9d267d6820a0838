"""The sample grids a run writes from G-EMA: fixed prompts and seed, so grids of different
steps show the same captions and latents."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gigagan_train.checkpoint import step_folder_name
from gigagan_train.data.batches import first_items, is_iterable
from gigagan_train.images import save_grid
from gigagan_train.networks import downsample, pyramid_of
from gigagan_train.spec import SamplingSpec
from gigagan_upsampler.interpolate import InterpolationUpsampler

__all__ = ["SampleGrids"]


class SampleGrids:
    """Writes ``samples/step-N.png`` (and a JSON of its captions) for a generator or an
    upsampler. The training RNG is left as it was, so writing samples never changes a run.

    A generator's grid draws ``prompts`` (or ``sampling.num`` unconditional images) with
    ``sampling.seed``; an upsampler's shows rows of input (nearest), bicubic, output and target
    for eight fixed dataset images."""

    def __init__(
        self,
        folder: Path,
        sampling: SamplingSpec,
        *,
        prompts: list[str] | None,
        upsampler: bool,
        dataset: Any,
        dataset_kind: str,
        seed: int,
        device: torch.device,
    ) -> None:
        self.folder = folder / "samples"
        self.sampling = sampling
        self.prompts = prompts
        self.upsampler = upsampler
        self.dataset = dataset
        self.dataset_kind = dataset_kind
        self.seed = seed
        self.device = device
        self._images: Tensor | None = None
        self._captions: list[str] = []

    @torch.no_grad()
    def write(self, generator: nn.Module, step: int, kimg: float) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{step_folder_name(step)}.png"
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            if self.upsampler:
                images, captions, nrow = self._upsampler_grid(generator)
            else:
                images, captions, nrow = self._generator_grid(generator)
        save_grid(images, path, nrow=nrow, captions=captions)
        meta = {
            "step": step,
            "kimg": kimg,
            "seed": self.sampling.seed,
            "truncation": self.sampling.truncation,
            "captions": captions,
        }
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        return path

    def _generator_grid(self, generator: nn.Module) -> tuple[Tensor, list[str] | None, int]:
        sampling, prompts = self.sampling, self.prompts
        num = len(prompts) if prompts is not None else sampling.num
        sample = getattr(generator, "sample", None)
        if callable(sample):
            out = sample(prompts, num=num, seed=sampling.seed, psi=sampling.truncation)
            images = pyramid_of(out)[0]
        else:
            torch.manual_seed(sampling.seed)
            z_dim = int(getattr(generator, "z_dim"))  # noqa: B009 - a module attribute
            z = torch.randn(num, z_dim, device=self.device)
            images = pyramid_of(generator(z, prompts))[0]
        return images.float().clamp(-1, 1), prompts, max(1, math.ceil(num**0.5))

    def _upsampler_grid(self, generator: nn.Module) -> tuple[Tensor, list[str] | None, int]:
        if self._images is None:
            items = first_items(self.dataset, 8, seed=self.seed, kind=self.dataset_kind)
            if not is_iterable(self.dataset):
                items = items[: len(self.dataset)]
            self._images = torch.stack([item["image"] for item in items])
            self._captions = [str(item["caption"]) for item in items]
        high = self._images.to(self.device)
        low = downsample(high, int(getattr(generator, "scale", 1)))
        texts = self._captions if getattr(generator, "conditional", False) else None
        torch.manual_seed(self.sampling.seed)
        out = pyramid_of(generator(low, texts))[0].float().clamp(-1, 1)
        nearest = F.interpolate(low, size=high.shape[-2:], mode="nearest")
        bicubic = InterpolationUpsampler(int(getattr(generator, "scale", 1)), "bicubic")(low)
        # rows of four: input (nearest), bicubic, output, target
        grid = torch.stack([nearest, bicubic, out, high], dim=1).flatten(0, 1)
        parts = ("input", "bicubic", "output", "target")
        captions = [f"[{part}]" for _ in range(len(high)) for part in parts]
        if texts is not None:
            captions = [f"{c} [{part}]" for c in texts for part in parts]
        return grid, captions, len(parts)
