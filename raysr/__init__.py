"""raysr: super-resolution GAN training (SRGAN, ESRGAN, SRResNet, RRDBNet, SRCNN, VDSR) on Ray.

``models``, ``losses``, ``ops``, ``metrics``, ``data``, ``engine``, ``generator_file`` and the
inference tools are plain PyTorch/Python and never import ray; the layer of every module, and
which ones may import ray, is in ``tests/test_layering.py`` and ``docs/modules.md``.
"""

__version__ = "0.1.0"
