"""An example third-party gigagan plugin: a captioned checkerboard dataset, a feature-matching
loss and a patch discriminator."""

from gigagan_example_plugin.checkerboard import Checkerboard, CheckerboardSpec
from gigagan_example_plugin.patch_discriminator import PatchDiscriminator, PatchDiscriminatorSpec

__all__ = ["Checkerboard", "CheckerboardSpec", "PatchDiscriminator", "PatchDiscriminatorSpec"]
