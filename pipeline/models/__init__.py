"""Network definitions, one module per GAN family, plus shared ``layers``. Importing this
package imports torch and the network modules, nothing else.
"""

from pipeline.models.dcgan import DCGANDiscriminator, DCGANGenerator
from pipeline.models.pix2pix import NLayerDiscriminator, PixelDiscriminator, UnetGenerator, unet_128, unet_256
from pipeline.models.pix2pixhd import Encoder, GlobalGenerator, LocalEnhancer, MultiscaleDiscriminator

__all__ = [
    "Encoder",
    "GlobalGenerator",
    "LocalEnhancer",
    "MultiscaleDiscriminator",
    "DCGANDiscriminator",
    "DCGANGenerator",
    "NLayerDiscriminator",
    "PixelDiscriminator",
    "UnetGenerator",
    "unet_128",
    "unet_256",
]
