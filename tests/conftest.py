"""Shared fixtures: installed-looking distributions on sys.path, a clean plugin environment."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from gigagan_core.plugins import ALLOWLIST_ENV, AUTOLOAD_ENV, reset_registry

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _clean_plugin_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts with no plugin switches set and a registry loaded afresh."""
    monkeypatch.delenv(AUTOLOAD_ENV, raising=False)
    monkeypatch.delenv(ALLOWLIST_ENV, raising=False)
    reset_registry()
    yield
    reset_registry()


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """One intra-op thread per test: the tensors are tiny, and pytest-xdist already runs one
    worker per core, so more threads would only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


DistFactory = Callable[..., Path]


@pytest.fixture
def make_distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[DistFactory]:
    """Write a distribution (``*.dist-info`` + modules) that importlib.metadata discovers.

    ``make_distribution("acme-gan", modules={"acme_gan": "source"}, entry_points={"acme":
    "acme_gan"})`` puts it on ``sys.path`` for the test; modules it adds are forgotten after.
    """
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    added: list[str] = []

    def factory(
        name: str,
        *,
        modules: dict[str, str],
        entry_points: dict[str, str],
        version: str = "1.0.0",
    ) -> Path:
        for module, source in modules.items():
            (site / f"{module}.py").write_text(textwrap.dedent(source))
            added.append(module)
        info = site / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        lines = ["[gigagan]"] + [f"{ep} = {target}" for ep, target in entry_points.items()]
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
        return site

    yield factory
    for module in added:
        sys.modules.pop(module, None)


@pytest.fixture
def toy_plugin() -> Callable[..., str]:
    """``toy_plugin(kind)``: source of a plugin module registering one toy dataset."""
    return _toy_plugin_source


def _toy_plugin_source(kind: str, spec_name: str = "ToySpec") -> str:
    return f'''
        from typing import ClassVar, Literal
        from pydantic import Field
        from gigagan_core.plugins import Component, hookimpl
        from gigagan_core.specs import ComponentSpec

        class {spec_name}(ComponentSpec):
            """A toy dataset spec."""
            role: ClassVar[str] = "dataset"
            kind: Literal["{kind}"] = "{kind}"
            size: int = Field(3, ge=1, description="Number of samples.")

        class Toy:
            """Toy dataset of {kind}."""
            def __init__(self, spec):
                self.spec = spec
            def __len__(self):
                return self.spec.size

        @hookimpl
        def gigagan_components():
            return [Component(spec={spec_name}, factory=Toy)]
    '''
