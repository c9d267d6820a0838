"""The plugin module named by this package's ``gigagan`` entry point."""

from __future__ import annotations

from gigagan_core.plugins import Component, hookimpl
from gigagan_example_plugin.checkerboard import Checkerboard, CheckerboardSpec
from gigagan_example_plugin.feature_matching import FeatureMatching, FeatureMatchingSpec
from gigagan_example_plugin.patch_discriminator import PatchDiscriminator, PatchDiscriminatorSpec


@hookimpl
def gigagan_components() -> list[Component]:
    return [
        Component(spec=CheckerboardSpec, factory=Checkerboard),
        Component(spec=FeatureMatchingSpec, factory=FeatureMatching),
        Component(spec=PatchDiscriminatorSpec, factory=PatchDiscriminator),
    ]
