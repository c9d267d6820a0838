"""The text-feature cache: the frozen encoder's features stored per caption, equal to what the
encoder gives, rebuilt for another encoder, and used by the training loop."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from gigagan_train.data import SyntheticShapes
from gigagan_train.data.textcache import TextFeatureCache, encoder_digest
from gigagan_train.loop import Trainer

CAPTIONS = [
    "a red circle on a blue background",
    "a white ring on a black background",
    "a green square on a yellow background",
]


def _close(a, b) -> None:  # type: ignore[no-untyped-def]
    # equal up to the rounding of a different batch composition in the encoder
    torch.testing.assert_close(a.tokens, b.tokens, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(a.pooled, b.pooled, atol=2e-4, rtol=1e-4)
    assert torch.equal(a.mask, b.mask)
    assert torch.equal(a.eot_index, b.eot_index)


def _encoder(make_spec):  # type: ignore[no-untyped-def]
    from gigagan_train.assemble import assemble

    return assemble(make_spec()).model.text_encoder


def test_built_file_gives_the_encoders_features_row_for_row(make_spec, tmp_path):
    encoder = _encoder(make_spec)
    path = tmp_path / "cache.safetensors"
    cache = TextFeatureCache(
        encoder, path, digest=encoder_digest(encoder), device=torch.device("cpu")
    )
    assert cache.build([*CAPTIONS, CAPTIONS[0]], batch_size=2) == 3  # distinct captions
    batch = [CAPTIONS[2], CAPTIONS[0], CAPTIONS[2]]
    with torch.no_grad():
        expected = encoder(batch)
    _close(cache(batch), expected)
    assert (cache.hits, cache.misses) == (3, 0)
    # a second cache on the same file reads it, and encodes nothing
    again = TextFeatureCache(
        encoder, path, digest=encoder_digest(encoder), device=torch.device("cpu")
    )
    assert len(again) == 3 and again.build(CAPTIONS) == 0
    # an unknown caption is encoded on first use and kept in memory
    _close(
        again(["a black triangle on a white background"]),
        encoder(["a black triangle on a white background"]),
    )
    assert again.misses == 1 and len(again) == 4


def test_a_cache_of_another_encoder_is_rebuilt(make_spec, tmp_path):
    encoder = _encoder(make_spec)
    path = tmp_path / "cache.safetensors"
    TextFeatureCache(
        encoder, path, digest=encoder_digest(encoder), device=torch.device("cpu")
    ).build(CAPTIONS)
    other = _encoder(make_spec)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.5)
    assert encoder_digest(other) != encoder_digest(encoder)
    stale = TextFeatureCache(other, path, digest=encoder_digest(other), device=torch.device("cpu"))
    assert len(stale) == 0  # the file is not trusted
    assert stale.build(CAPTIONS) == 3
    _close(stale(CAPTIONS[:1]), other(CAPTIONS[:1]))
    assert not torch.allclose(stale(CAPTIONS[:1]).tokens, encoder(CAPTIONS[:1]).tokens, atol=1e-2)


class _Listed(Dataset):
    """Synthetic shapes that can list their captions, as the image folder can."""

    def __init__(self) -> None:
        self.inner = SyntheticShapes(resolution=16, size=12)
        self.calls = 0

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> dict:
        return {**self.inner[i], "skipped": []}

    def captions(self) -> list[str]:
        self.calls += 1
        return [str(self.inner[i]["caption"]) for i in range(len(self.inner))]


def test_training_with_the_cache_encodes_each_caption_once(make_spec, tmp_path):
    spec = make_spec(steps=2, text_cache=True)
    trainer = Trainer(spec, tmp_path / "r")
    listed = _Listed()
    trainer.run.dataset = listed
    trainer.text_cache = trainer.make_text_cache()
    encoder = trainer.encoder
    calls = []
    original = encoder.forward

    def counting(texts):  # type: ignore[no-untyped-def]
        calls.append(list(texts))
        return original(texts)

    encoder.forward = counting
    trainer.fit()
    assert listed.calls == 1
    assert (tmp_path / "r" / "text_cache.safetensors").is_file()
    # every caption of the data came from the file; the encoder ran only for the grid's
    # prompts (G-EMA's sampling at step 2)
    assert calls == [trainer.sample_prompts]
    assert trainer.text_cache.hits == 2 * spec.batch_size


def test_an_unreadable_cache_file_is_rebuilt(make_spec, tmp_path):
    encoder = _encoder(make_spec)
    path = tmp_path / "cache.safetensors"
    path.write_bytes(b"\x00" * 64)  # a damaged file (an interrupted copy, a full disk)
    digest = encoder_digest(encoder)
    cache = TextFeatureCache(encoder, path, digest=digest, device=torch.device("cpu"))
    assert len(cache) == 0
    assert cache.build(CAPTIONS) == 3
    _close(cache(CAPTIONS[:2]), encoder(CAPTIONS[:2]))
