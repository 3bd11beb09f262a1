"""raysr: super-resolution GAN training (SRGAN, ESRGAN, SRResNet, RRDBNet, SRCNN, VDSR) on Ray.

The modules below ``models``, ``losses``, ``ops``, ``metrics``, ``data`` and
``checkpoint`` are plain PyTorch/Python and never import ray.
"""

__version__ = "0.1.0"
