"""The two sides of an evaluation: the real sample and the generated images.

Every metric compares ``n`` generated images with ``n`` real images drawn from the dataset
with the evaluation seed; a text-conditional generator is given the captions of those real
images as its prompts, so both sets follow the same caption distribution.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gigagan_core.plugins import get_registry
from gigagan_core.specs import ComponentSpec
from gigagan_train.errors import RunError
from gigagan_train.networks import first_image, module_device
from gigagan_train.spec import EvalSpec

__all__ = ["RealSample", "build_dataset", "draw_real", "eval_prompts", "generate_images"]

log = logging.getLogger(__name__)


class RealSample:
    """The ``n`` real images an evaluation compares with: dataset indices drawn with the
    evaluation seed, and their captions (the prompts of a text-conditional generator)."""

    def __init__(self, dataset: Any, indices: list[int], captions: list[str]) -> None:
        self.dataset = dataset
        self.indices = indices
        self.captions = captions

    def __len__(self) -> int:
        return len(self.indices)

    def batches(self, batch_size: int) -> Iterator[Tensor]:
        """The images ``b c h w`` in [-1, 1], in order, ``batch_size`` at a time."""
        for start in range(0, len(self.indices), batch_size):
            chunk = self.indices[start : start + batch_size]
            yield torch.stack([_image_of(self.dataset[i]) for i in chunk]).float()


def _image_of(item: Any) -> Tensor:
    image = item["image"] if isinstance(item, dict) else item
    if not isinstance(image, Tensor) or image.ndim != 3:
        raise RunError("the dataset must yield {'image': Tensor[c h w], 'caption': str} items")
    return image


def build_dataset(dataset: ComponentSpec) -> Any:
    """The dataset a dataset spec describes, built through the registry."""
    return get_registry().build(dataset)


def draw_real(data: Any, n: int, seed: int) -> RealSample:
    """``n`` distinct dataset items drawn with ``seed`` (all of them, in a seeded order, when
    the dataset is smaller)."""
    try:
        size = len(data)
    except TypeError as exc:
        raise RunError("evaluation needs a dataset with a length (a map-style dataset)") from exc
    if size < 2:
        raise RunError(f"the dataset has {size} item(s); evaluation needs at least 2")
    if size < n:
        log.warning("the dataset has %d items, fewer than n=%d: all are used as reals", size, n)
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    indices = order[: min(n, size)].tolist()
    captions = []
    for i in indices:
        item = data[i]
        captions.append(str(item.get("caption", "")) if isinstance(item, dict) else "")
    return RealSample(data, indices, captions)


def eval_prompts(dataset: ComponentSpec, spec: EvalSpec, data: Any = None) -> list[str]:
    """The ``spec.n`` prompts :func:`evaluate_generator` gives a text-conditional generator
    (the captions of the real sample, repeated when the dataset is smaller than n)."""
    real = draw_real(data if data is not None else build_dataset(dataset), spec.n, spec.seed)
    return [real.captions[i % len(real)] for i in range(spec.n)]


@torch.no_grad()
def generate_images(
    generator: nn.Module,
    prompts: Sequence[str] | None,
    *,
    num: int,
    batch_size: int,
    seed: int,
    psi: float = 1.0,
) -> Iterator[tuple[Tensor, list[str] | None]]:
    """``num`` images (``b 3 h w`` in [-1, 1], float32, on CPU) in batches, with the prompts
    of each batch. Batch ``k`` is ``G.sample(prompts, num=b, seed=seed * 1_000_003 + k,
    psi=psi)`` (or ``G(z, prompts)`` with ``z`` from that seed for a generator without
    ``sample``), so the same seed and batch size give the same images."""
    if prompts is not None and len(prompts) != num:
        raise ValueError(f"num={num} but {len(prompts)} prompts")
    device = module_device(generator)
    sample = getattr(generator, "sample", None)
    for k, start in enumerate(range(0, num, batch_size)):
        count = min(batch_size, num - start)
        texts = list(prompts[start : start + count]) if prompts is not None else None
        batch_seed = seed * 1_000_003 + k
        if callable(sample):
            out = sample(texts, num=count, seed=batch_seed, psi=psi)
        else:
            gen = torch.Generator(device).manual_seed(batch_seed)
            z_dim = int(getattr(generator, "z_dim"))  # noqa: B009 - a module attribute
            z = torch.randn(count, z_dim, generator=gen, device=device)
            out = generator(z, texts)
        yield first_image(out).detach().float().clamp(-1, 1).cpu(), texts
