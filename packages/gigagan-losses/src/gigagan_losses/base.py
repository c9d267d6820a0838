"""The one interface every loss implements, built-in or third-party.

A training step builds one :class:`LossContext` per phase (``"G"``: update the generator;
``"D"``: update the discriminator) and asks each loss for its terms in that phase::

    ctx = LossContext(phase="D", step=step, real=images, texts=captions,
                      generator=G, discriminator=D, fake_pyramid=G(z, captions).pyramid)
    total = sum(loss.weight * sum(loss(ctx).values()) for loss in losses if loss.active(ctx))

A loss is a :class:`Loss` subclass with a spec (a :class:`LossSpec` subclass, so it has a
``weight``) that

- declares the phases it contributes to in ``phases`` (``{"G"}``, ``{"D"}`` or both),
- implements :meth:`Loss.generator_terms` and/or :meth:`Loss.discriminator_terms`, each
  returning **named, unweighted scalar terms** (``{"adv_fake": tensor(...)}``); the trainer
  multiplies their sum by the spec's ``weight`` and logs each term by name,
- may override :meth:`Loss.active` to skip steps (lazy regularisation).

The context computes the expensive shared things (discriminator outputs on real and fake
images, the text embedding, the mismatched-caption outputs) on first use and caches them, so
five losses that all read ``ctx.d_fake`` cost one discriminator pass. In the ``"D"`` phase
the fake pyramid is detached; in the ``"G"`` phase it carries the generator's graph.

Passes that are wanted together run as **one batched discriminator call** where that
changes no value: in the ``"D"`` phase the first read of ``d_real`` or ``d_fake`` computes
both in one call on the real and fake images stacked along the batch, and
:meth:`LossContext.prefetch` does the same for any set of the cached outputs (e.g.
``ctx.prefetch("real", "fake", "real_mismatched")`` with the matching-aware loss). It needs
a discriminator whose forward takes ``stacked=k`` (``k`` independent batches concatenated,
minibatch statistics kept within each, as :class:`~gigagan_core.nets.MultiScaleDiscriminator`
does); any other discriminator gets one call per output, as before. A discriminator whose
image features do not depend on the caption and whose forward takes ``caption_sets=m``
(:class:`~gigagan_core.nets.ProjectionDiscriminator`) gets the images once when passes want
them with their own and with mismatched captions: the matching-aware loss then costs it no
extra image pass.

A context serves **one backward pass and one optimiser step**: its cached outputs hold the
graph of that pass and the parameters as they were. To run another pass on the same batch
after a step (for example R1 as its own optimiser step, as StyleGAN2 does), build a new
context or call :meth:`LossContext.invalidate`.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from gigagan_core.errors import InputError
from gigagan_core.frozen import trainable_parameters
from gigagan_core.nets.discriminator import DiscriminatorOutput
from gigagan_core.nets.pyramid import build_pyramid
from gigagan_core.nets.text_features import TextFeatures
from gigagan_core.specs import ComponentSpec

__all__ = ["LatentPairs", "Loss", "LossContext", "LossSpec", "Phase"]

Phase = Literal["G", "D"]


class LossSpec(ComponentSpec):
    """Base of every loss spec: ``role = "loss"`` and a ``weight``."""

    role: ClassVar[str] = "loss"
    weight: float = Field(
        1.0, ge=0, allow_inf_nan=False, description="Multiplier of this loss in the total."
    )


@dataclass(frozen=True)
class LatentPairs:
    """Second samples of the first ``k`` captions of a batch, each from another latent.

    Row ``i`` of ``pyramid`` (highest resolution first) is the generator's image for caption
    ``i`` of the batch from a latent ``z'_i`` drawn apart from the ``z_i`` that made row
    ``i`` of the context's ``fake_pyramid``; ``latent_distance`` (``k``) holds
    ``mean |z_i - z'_i|``. A trainer makes them, in the same generator call as the batch's
    fakes, for losses whose :meth:`Loss.latent_pairs` asks for them (the diversity loss).
    """

    pyramid: list[Tensor]
    latent_distance: Tensor

    def __post_init__(self) -> None:
        if not self.pyramid:
            raise InputError("LatentPairs needs a pyramid of at least one level")
        k = self.pyramid[0].shape[0]
        if self.latent_distance.shape != (k,):
            raise InputError(
                f"latent_distance must have one value per pair ({k}), got shape "
                f"{tuple(self.latent_distance.shape)}"
            )

    def __len__(self) -> int:
        return self.pyramid[0].shape[0]

    def detach(self) -> LatentPairs:
        return LatentPairs([x.detach() for x in self.pyramid], self.latent_distance.detach())


class LossContext:
    """Everything a training step has, with lazily computed and cached shared quantities.

    Inputs (``b`` samples):

    - ``phase``: ``"G"`` or ``"D"``; ``step``: the training step index (0-based).
    - ``real``: ``b c H W`` real images in [-1, 1]; ``texts``: their ``b`` captions (or
      ``None`` for unconditional training).
    - ``generator``, ``discriminator``: the networks (``discriminator`` is called as
      ``D(pyramid, text_embedding=t)`` and exposes ``encode_text`` and ``levels``).
    - ``fake_pyramid``: the generator's images for ``texts``, highest resolution first;
      detached here in the ``"D"`` phase. In the ``"G"`` phase, with a ``generator`` and
      gradients enabled, a pyramid that carries no gradient draws a warning (G would not
      train).
    - ``text_features``: the frozen encoder's output for ``texts`` if the step has it
      (losses that need captions in another form read ``texts``).
    - ``fake_pairs``: a :class:`LatentPairs` (second samples of the first captions from other
      latents) where a loss asked for them; detached in the ``"D"`` phase.
    - ``extras``: free-form values a trainer or plugin wants to pass along.
    - ``batch_d_passes``: in the ``"D"`` phase, compute ``d_real`` and ``d_fake`` together in
      one stacked discriminator call (see the module docstring); off: one call each.
    - ``augment``: applied to the images of the cached discriminator passes (a
      :class:`~gigagan_losses.augment.Augment`: one draw per sample and pass, every pyramid
      level alike; where a caption-set call serves an image with its own and a mismatched
      caption, one draw serves both). :meth:`discriminate` does not augment, so a
      regulariser such as R1 sees the images as they are.

    Cached on first use: :attr:`real_pyramid`, :attr:`text_embedding`, :attr:`d_real`,
    :attr:`d_fake`, :attr:`d_real_mismatched`, :attr:`d_fake_mismatched`,
    :attr:`d_real_nearest`, :attr:`d_fake_nearest`; and anything a loss stores through
    :meth:`cached`.
    """

    def __init__(
        self,
        *,
        phase: Phase,
        step: int,
        real: Tensor,
        texts: Sequence[str] | None,
        generator: nn.Module | None,
        discriminator: nn.Module,
        fake_pyramid: Sequence[Tensor],
        text_features: TextFeatures | None = None,
        fake_pairs: LatentPairs | None = None,
        extras: dict[str, Any] | None = None,
        batch_d_passes: bool = True,
        augment: Callable[[list[Tensor]], list[Tensor]] | None = None,
    ) -> None:
        if phase not in ("G", "D"):
            raise InputError(f"phase must be 'G' or 'D', got {phase!r}")
        if texts is not None and len(texts) != real.shape[0]:
            raise InputError(f"{real.shape[0]} real images but {len(texts)} captions")
        self.phase: Phase = phase
        self.step = step
        self.real = real
        self.texts = list(texts) if texts is not None else None
        self.generator = generator
        self.discriminator = discriminator
        pyramid = list(fake_pyramid)
        self.fake_pyramid = [x.detach() for x in pyramid] if phase == "D" else pyramid
        if (
            phase == "G"
            and generator is not None
            and torch.is_grad_enabled()
            and pyramid
            and not any(x.requires_grad for x in pyramid)
        ):
            warnings.warn(
                "LossContext: phase 'G' with a generated pyramid that carries no gradient "
                "(detached, or made under no_grad): the generator would not train. Pass "
                "G's output as it is, or build the context under torch.no_grad to evaluate.",
                stacklevel=2,
            )
        self.text_features = text_features
        if fake_pairs is not None and len(fake_pairs) > self.batch_size:
            raise InputError(
                f"{len(fake_pairs)} latent pairs for a batch of {self.batch_size}: a pair "
                "repeats one of the batch's captions"
            )
        self.fake_pairs = (
            fake_pairs.detach() if fake_pairs is not None and phase == "D" else fake_pairs
        )
        self.extras = dict(extras or {})
        self.batch_d_passes = batch_d_passes
        self.augment = augment
        self._cache: dict[str, Any] = {}

    @property
    def batch_size(self) -> int:
        return self.real.shape[0]

    @property
    def fake(self) -> Tensor:
        """The generated images at full resolution (``fake_pyramid[0]``)."""
        return self.fake_pyramid[0]

    def invalidate(self) -> None:
        """Forget every cached value (after a backward or an optimiser step)."""
        self._cache.clear()

    def computed(self, key: str) -> bool:
        """Whether ``key`` (e.g. ``"d_real"``) has been computed in this context."""
        return key in self._cache

    def cached(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per context under ``key``; later calls return the same value."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    @property
    def real_pyramid(self) -> list[Tensor]:
        """The real images as a pyramid with as many levels as the fake one."""
        return self.cached("real_pyramid", lambda: build_pyramid(self.real, len(self.fake_pyramid)))

    @property
    def text_embedding(self) -> Tensor | None:
        """The discriminator's text embedding ``t_D`` of ``texts`` (``None`` if unconditional).

        In the ``"D"`` phase it carries gradients into the discriminator's text branch; in
        the ``"G"`` phase it is computed the same way (the generator's optimiser never sees
        the discriminator's parameters).
        """

        def compute() -> Tensor | None:
            if not getattr(self.discriminator, "conditional", self.texts is not None):
                return None
            source = self.text_features if self.text_features is not None else self.texts
            return self.discriminator.encode_text(source, batch_size=self.batch_size)

        return self.cached("text_embedding", compute)

    def _captions_to_mismatch(self) -> Tensor:
        """``t_D``, where wrong captions can be drawn from it (a conditional discriminator,
        a batch of at least 2)."""
        t = self.text_embedding
        if t is None:
            raise InputError("mismatched captions need a text-conditional discriminator")
        if self.batch_size < 2:
            raise InputError("mismatched captions need a batch of at least 2")
        return t

    def mismatched_text_embedding(self, shifts: int = 1) -> Tensor:
        """``t_D`` rolled along the batch so that no image keeps its own caption (Eq. 8)."""
        t = self._captions_to_mismatch()
        if shifts % self.batch_size == 0:
            raise InputError(f"shifts={shifts} leaves every caption with its own image")
        return torch.roll(t, shifts, dims=0)

    def nearest_text_embedding(self) -> Tensor:
        """``t_D`` re-ordered so that each image meets the batch's *closest other* caption:
        the row of highest cosine similarity to its own, rows equal to its own (the same
        caption twice) excluded. These are hard negatives for a matching loss: on a batch
        of captions that share words they differ from the image's caption in the fewest
        words, so the discriminator cannot reject them on the most distinct attribute
        alone. A row with no other caption in the batch falls back to the roll of
        :meth:`mismatched_text_embedding`. The choice is made without a graph; the chosen
        rows keep theirs."""
        t = self._captions_to_mismatch()

        def index() -> Tensor:
            with torch.no_grad():
                flat = t.detach().float().flatten(1)
                same = (flat[:, None, :] == flat[None, :, :]).all(dim=-1)
                unit = torch.nn.functional.normalize(flat, dim=1)
                similarity = (unit @ unit.T).masked_fill(same, float("-inf"))
                choice = similarity.argmax(dim=1)  # the first of equally close captions
                alone = torch.isinf(similarity.gather(1, choice[:, None])[:, 0])
                rolled = torch.roll(torch.arange(t.shape[0], device=t.device), 1)
                return torch.where(alone, rolled, choice)

        return t[self.cached("nearest_index", index)]

    def discriminate(self, pyramid: Sequence[Tensor], text_embedding: Tensor | None) -> Any:
        """One discriminator pass (not cached): ``D(pyramid, text_embedding=t)``."""
        return self.discriminator(list(pyramid), text_embedding=text_embedding)

    # ---- the cached discriminator outputs -----------------------------------------------

    PASSES: ClassVar[tuple[str, ...]] = (
        "real",
        "fake",
        "real_mismatched",
        "fake_mismatched",
        "real_nearest",
        "fake_nearest",
    )
    """Names of the cached passes, for :meth:`prefetch` (``"real"`` is :attr:`d_real`):
    the images (real or fake) with their own captions, with the rolled ones
    (:meth:`mismatched_text_embedding`) or with the closest other ones
    (:meth:`nearest_text_embedding`)."""

    @staticmethod
    def _captions_of(name: str) -> str:
        """Which captions pass ``name`` pairs its images with: its suffix, '' for their own."""
        return name.partition("_")[2]

    def _embedding_of(self, captions: str) -> Tensor | None:
        if captions == "mismatched":
            return self.mismatched_text_embedding()
        if captions == "nearest":
            return self.nearest_text_embedding()
        return self.text_embedding

    def _pass_inputs(self, name: str) -> tuple[list[Tensor], Tensor | None]:
        pyramid = self.real_pyramid if name.startswith("real") else self.fake_pyramid
        t = self._embedding_of(self._captions_of(name))
        if self.augment is not None:
            return list(self.augment(list(pyramid))), t
        return list(pyramid), t

    def prefetch(self, *names: str) -> None:
        """Compute the named outputs (of :attr:`PASSES`) not cached yet, in one stacked call.

        The images of the passes are concatenated along the batch (pyramid level by level,
        text embeddings alike) and the discriminator is told they are ``k`` independent
        batches (``stacked=k``), so each output equals that of its own call up to float
        rounding, gradients included. A discriminator that does not take ``stacked`` gets
        one call per pass. Reading the outputs afterwards costs nothing.
        """
        todo = [n for n in dict.fromkeys(names) if f"d_{n}" not in self._cache]
        if not todo:
            return
        for name in todo:
            if name not in self.PASSES:
                raise InputError(
                    f"unknown discriminator pass {name!r}; expected one of {self.PASSES}"
                )
        if self._prefetch_caption_sets(todo):
            return
        inputs = [self._pass_inputs(name) for name in todo]
        sizes = {p[0].shape[0] for p, _ in inputs}
        if len(todo) == 1 or len(sizes) > 1 or not _accepts_stacked(self.discriminator):
            for name, (pyramid, t) in zip(todo, inputs, strict=True):
                self._cache[f"d_{name}"] = self.discriminate(pyramid, t)
            return
        levels = len(inputs[0][0])
        pyramid = [torch.cat([p[level] for p, _ in inputs]) for level in range(levels)]
        embeddings = [t for _, t in inputs]
        t = None if embeddings[0] is None else torch.cat(embeddings)  # type: ignore[arg-type]
        output = self.discriminator(pyramid, text_embedding=t, stacked=len(todo))
        for name, part in zip(todo, _split_output(output, len(todo)), strict=True):
            self._cache[f"d_{name}"] = part

    def _prefetch_caption_sets(self, todo: list[str]) -> bool:
        """Passes that need an image with both its own and a mismatched caption, from one
        call of a discriminator that scores caption sets (``caption_sets=k``: its image
        features do not depend on the caption, e.g. a projection discriminator). The images
        of each source (real, fake) go in once, augmented once; every (source, caption)
        combination comes back and is cached. Returns whether it ran."""
        variants = list(dict.fromkeys(self._captions_of(n) for n in todo))
        if len(variants) < 2 or not _accepts_keyword(self.discriminator, "caption_sets"):
            return False
        if self.text_embedding is None:
            return False
        sources = list(dict.fromkeys("real" if n.startswith("real") else "fake" for n in todo))
        pyramids = []
        for source in sources:
            pyramid = list(self.real_pyramid if source == "real" else self.fake_pyramid)
            pyramids.append(list(self.augment(pyramid)) if self.augment is not None else pyramid)
        if len({p[0].shape[0] for p in pyramids}) > 1:
            return False
        levels = len(pyramids[0])
        pyramid = [torch.cat([p[level] for p in pyramids]) for level in range(levels)]
        sets = [self._embedding_of(captions) for captions in variants]
        t = torch.cat([e for e in sets for _ in sources])
        output = self.discriminator(
            pyramid, text_embedding=t, stacked=len(sources), caption_sets=len(variants)
        )
        parts = _split_output(output, len(sources) * len(variants))
        k = 0
        for captions in variants:
            for source in sources:
                key = f"d_{source}{'_' + captions if captions else ''}"
                self._cache.setdefault(key, parts[k])
                k += 1
        return True

    def _d_output(self, name: str) -> Any:
        key = f"d_{name}"
        if key not in self._cache:
            if self.phase == "D" and self.batch_d_passes and name in ("real", "fake"):
                self.prefetch("real", "fake")
            else:
                self.prefetch(name)
        return self._cache[key]

    @property
    def d_real(self) -> Any:
        """Discriminator output on real images with their own captions."""
        return self._d_output("real")

    @property
    def d_fake(self) -> Any:
        """Discriminator output on the generated pyramid with its captions."""
        return self._d_output("fake")

    @property
    def d_real_mismatched(self) -> Any:
        """Discriminator output on real images paired with rolled (wrong) captions."""
        return self._d_output("real_mismatched")

    @property
    def d_fake_mismatched(self) -> Any:
        """Discriminator output on generated images paired with rolled (wrong) captions."""
        return self._d_output("fake_mismatched")

    @property
    def d_real_nearest(self) -> Any:
        """Discriminator output on real images paired with the batch's closest other
        captions (:meth:`nearest_text_embedding`)."""
        return self._d_output("real_nearest")

    @property
    def d_fake_nearest(self) -> Any:
        """Discriminator output on generated images paired with the batch's closest other
        captions (:meth:`nearest_text_embedding`)."""
        return self._d_output("fake_nearest")


def _unwrapped(module: Any) -> Any:
    """The module under DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    for _ in range(4):
        inner = getattr(module, "_orig_mod", None)
        if inner is None and isinstance(module, nn.parallel.DistributedDataParallel):
            inner = module.module
        if inner is None:
            return module
        module = inner
    return module


def _accepts_stacked(discriminator: Any) -> bool:
    """Whether the discriminator's forward names a ``stacked`` keyword (an explicit promise:
    a bare ``**kwargs`` is not one)."""
    return _accepts_keyword(discriminator, "stacked")


def _accepts_keyword(discriminator: Any, keyword: str) -> bool:
    """Whether the discriminator's forward names ``keyword`` as a parameter."""
    forward = getattr(_unwrapped(discriminator), "forward", None)
    if forward is None:
        return False
    try:
        parameter = inspect.signature(forward).parameters.get(keyword)
    except (TypeError, ValueError):
        return False
    return parameter is not None and parameter.kind in (
        inspect.Parameter.KEYWORD_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    )


def _split_output(output: Any, parts: int) -> list[Any]:
    """A stacked call's output as ``parts`` outputs of the contract, batch split evenly."""
    pairs = list(output.pairs())
    chunks = {pair: output[pair].chunk(parts, dim=0) for pair in pairs}
    resolutions = tuple(output.resolutions)
    return [
        DiscriminatorOutput(
            logits={pair: chunks[pair][k] for pair in pairs}, resolutions=resolutions
        )
        for k in range(parts)
    ]


class Loss(nn.Module):
    """Base class of every loss. See the module docstring for the contract.

    Subclasses set ``phases`` and override the ``*_terms`` methods of those phases. The
    module may own trainable parameters (e.g. vision-aided discriminator heads); the
    trainer gives the parameters of losses active in phase ``"D"`` to the discriminator's
    optimiser (:meth:`trainable_parameters`: frozen backbones are left out).
    """

    phases: ClassVar[frozenset[Phase]] = frozenset()

    def __init__(self, spec: LossSpec) -> None:
        super().__init__()
        self.spec = spec

    @classmethod
    def from_spec(cls, spec: LossSpec, **runtime: Any) -> Loss:
        return cls(spec, **runtime)

    @property
    def weight(self) -> float:
        return self.spec.weight

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters an optimiser should get: all but those of frozen submodules
        (backbones marked with :func:`gigagan_core.frozen.freeze`)."""
        return trainable_parameters(self)

    def active(self, ctx: LossContext) -> bool:
        """Whether this loss contributes at this step and phase (default: its phases)."""
        return ctx.phase in self.phases

    def discriminator_passes(self, ctx: LossContext) -> tuple[str, ...]:
        """The cached discriminator outputs (names of :attr:`LossContext.PASSES`) this loss
        reads in ``ctx.phase``. A trainer hands the union over all losses to
        :meth:`LossContext.prefetch`, so they come from one stacked discriminator call.
        Declaring nothing (the default) is always correct, only slower."""
        return ()

    def latent_pairs(self) -> int:
        """How many captions of each G-phase batch this loss wants generated a second time
        from other latents (:class:`LatentPairs`, read as ``ctx.fake_pairs``). A trainer
        makes the largest number any of its generator losses asks for (at most the batch);
        0 (the default): none."""
        return 0

    def generator_terms(self, ctx: LossContext) -> dict[str, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} has no generator terms")

    def discriminator_terms(self, ctx: LossContext) -> dict[str, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} has no discriminator terms")

    def forward(self, ctx: LossContext) -> dict[str, Tensor]:
        """The named, unweighted terms of ``ctx.phase`` (empty if inactive)."""
        if not self.active(ctx):
            return {}
        if ctx.phase == "G":
            return self.generator_terms(ctx)
        return self.discriminator_terms(ctx)

    def weighted_total(self, ctx: LossContext) -> Tensor | None:
        """``weight * sum(terms)``, or ``None`` when the loss has nothing this step."""
        terms = self(ctx)
        if not terms:
            return None
        dtype = torch.float32  # at least: half-precision terms are summed in float32
        for t in terms.values():
            dtype = torch.promote_types(dtype, t.dtype)
        return self.weight * torch.stack([t.to(dtype) for t in terms.values()]).sum()
