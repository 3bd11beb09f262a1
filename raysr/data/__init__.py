"""The data path: HR photos -> tar shards -> per-rank (LR, HR) batches. Never imports ray.

* ``python -m raysr.data.make_shards`` — sub-image shards + manifest.parquet, of HR images or of
  LR/HR pairs (``--lr-input``) (:mod:`raysr.data.make_shards`); the pairing rule is
  :mod:`raysr.data.pairing`.
* :func:`resolve_shards` — URL lists, brace patterns, directories, manifests;
  local or s3:// (:mod:`raysr.data.sources`).
* :func:`read_manifest` — the ``manifest.parquet`` table (:mod:`raysr.data.manifest`).
* :func:`iter_pairs` — ``(lr, hr)`` pairs in this process, to look at the data;
  :func:`iter_images` — the decoded HR samples (:mod:`raysr.data.stream`).
* :func:`check_train_shards` — fail fast on shards with no usable image (or LR/HR pair); what
  members make a sample (:mod:`raysr.data.samples`).
* :func:`make_train_loader` — a rank's endless batches; epochs, where their length
  is known, the same on every rank (:mod:`raysr.data.loader`);
  :func:`make_lr` — LR from HR on any device; :class:`DeviceBatches` — those batches finished
  on the training device (:mod:`raysr.data.device_batches`).
"""

from raysr.data.device_batches import DeviceBatches
from raysr.data.loader import TrainLoader, epoch_batches, make_train_loader, resolve_lr_on
from raysr.data.manifest import Manifest, read_manifest
from raysr.data.samples import check_train_shards
from raysr.data.sources import ShardList, resolve_shards
from raysr.data.stream import DataStats, iter_batches, iter_images, iter_pairs, make_lr

__all__ = ["DataStats", "DeviceBatches", "Manifest", "ShardList", "TrainLoader", "check_train_shards",
           "epoch_batches", "iter_batches", "iter_images", "iter_pairs", "make_lr",
           "make_train_loader", "read_manifest", "resolve_lr_on", "resolve_shards"]
