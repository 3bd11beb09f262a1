"""Real-ESRGAN's synthetic degradations (``data.degradation: realesrgan``). Plain torch/numpy; never imports ray.

* :mod:`raysr.degradation.kernels` — the blur and sinc kernels, drawn per sample (numpy).
* :mod:`raysr.degradation.regions` — the loader side: per sample the GT region and its kernels.
* :mod:`raysr.degradation.pipeline` — the device side: the batched second-order chain
  (:class:`Degrader`), and :class:`TrainingPairs` = chain → pair pool → USM-sharpened GT.
* :mod:`raysr.degradation.pool` — the training-pair pool, any batch size.

See docs/real-world.md.
"""

from raysr.degradation.pipeline import Degrader, TrainingPairs, training_pairs, usm_sharp
from raysr.degradation.pool import PairPool

__all__ = ["Degrader", "PairPool", "TrainingPairs", "training_pairs", "usm_sharp"]
