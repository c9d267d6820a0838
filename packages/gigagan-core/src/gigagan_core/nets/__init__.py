"""GigaGAN's networks: text path, mapping network, generator, MS-I/O and projection
discriminators."""

from gigagan_core.nets.conditioning import TextConditioning, TextTransformer, split_global_local
from gigagan_core.nets.discriminator import (
    DiscriminatorOutput,
    MultiScaleDiscriminator,
    MultiScaleDiscriminatorSpec,
)
from gigagan_core.nets.generator import (
    Generator,
    GeneratorOutput,
    GeneratorSpec,
    SynthesisLevel,
    SynthesisNetwork,
    slerp,
)
from gigagan_core.nets.mapping import MappingNetwork, truncate
from gigagan_core.nets.projection import ProjectionDiscriminator, ProjectionDiscriminatorSpec
from gigagan_core.nets.protocols import (
    SINGLE_SCALE_PAIR,
    DiscriminatorOutputError,
    DiscriminatorOutputProtocol,
    DiscriminatorProtocol,
    check_discriminator_output,
)
from gigagan_core.nets.pyramid import build_pyramid, check_pyramid
from gigagan_core.nets.text import CLIPTextEncoder, CLIPTextEncoderSpec
from gigagan_core.nets.text_features import TextFeatures

__all__ = [
    "SINGLE_SCALE_PAIR",
    "CLIPTextEncoder",
    "CLIPTextEncoderSpec",
    "DiscriminatorOutput",
    "DiscriminatorOutputError",
    "DiscriminatorOutputProtocol",
    "DiscriminatorProtocol",
    "Generator",
    "GeneratorOutput",
    "GeneratorSpec",
    "MappingNetwork",
    "MultiScaleDiscriminator",
    "MultiScaleDiscriminatorSpec",
    "ProjectionDiscriminator",
    "ProjectionDiscriminatorSpec",
    "SynthesisLevel",
    "SynthesisNetwork",
    "TextConditioning",
    "TextFeatures",
    "TextTransformer",
    "build_pyramid",
    "check_discriminator_output",
    "check_pyramid",
    "slerp",
    "split_global_local",
    "truncate",
]
