"""Image operations shared by the data pipeline, the models and evaluation (plain PyTorch, no Ray)."""

from raysr.ops.resize import imresize

__all__ = ["imresize"]
