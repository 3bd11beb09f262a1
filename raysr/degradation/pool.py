"""The training-pair pool of ``data.degradation: realesrgan``: past pairs mixed into every batch, per rank.

Real-ESRGAN draws some degradations once per batch (the resize scales); its pool
(``queue_size``) lets a batch hold pairs degraded in different batches. Its queue must be a
multiple of the batch size, which an elastic run, whose per-rank batch changes with the world
size, cannot promise. This pool is a ring of single pairs instead, so any batch size meets any
pool size: while it fills, each batch passes through unchanged and its pairs are copied in; once
full, ``min(batch, pool)`` randomly chosen positions of the batch trade places with as many
randomly chosen slots (Real-ESRGAN's exchange of a shuffled queue's first ``b`` entries, where
``b <= pool``). Everything of one pair (LR, HR, any other per-sample tensor) moves as a unit.
The pool lives on the device, is not checkpointed, and refills after a restart, as in Real-ESRGAN.
"""

from __future__ import annotations

import numpy as np
import torch

from raysr.util import check_int


class PairPool:
    """``size`` past samples; :meth:`exchange` takes a batch of tensors that share their first dimension.

    rng: the numpy Generator that picks positions and slots (seeded by the caller).
    """

    def __init__(self, size: int, rng: np.random.Generator):
        self.size = check_int("pool_size", size, minimum=0)
        self.rng = rng
        self.slots: list[torch.Tensor] | None = None
        self.filled = 0

    @torch.no_grad()
    def exchange(self, *batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The batch with pool pairs swapped in (see the module docstring); same shapes as given."""
        n = batch[0].shape[0]
        if any(t.shape[0] != n for t in batch):
            raise ValueError(f"the pool's tensors must share the batch size; got {[t.shape[0] for t in batch]}")
        if self.size == 0:
            return batch
        if self.slots is None:
            self.slots = [t.new_empty((self.size, *t.shape[1:])) for t in batch]
        elif [s.shape[1:] for s in self.slots] != [t.shape[1:] for t in batch]:
            raise ValueError(f"pool slots hold {[tuple(s.shape[1:]) for s in self.slots]}, the batch "
                             f"{[tuple(t.shape[1:]) for t in batch]}; one pool serves one pair size")
        if self.filled < self.size:
            take = min(n, self.size - self.filled)
            for slot, t in zip(self.slots, batch):
                slot[self.filled:self.filled + take] = t[:take]
            self.filled += take
            return batch
        count = min(n, self.size)
        device = batch[0].device
        positions = torch.from_numpy(self.rng.choice(n, size=count, replace=False)).to(device)
        chosen = torch.from_numpy(self.rng.choice(self.size, size=count, replace=False)).to(device)
        out = []
        for slot, t in zip(self.slots, batch):
            mixed = t.clone()
            mixed[positions] = slot[chosen]
            slot[chosen] = t[positions]
            out.append(mixed)
        return tuple(out)
