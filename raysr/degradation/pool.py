"""The training-pair pool of ``data.degradation: realesrgan``: past pairs mixed into every batch, per rank.

Real-ESRGAN draws some degradations once per batch (the resize scales); its pool
(``queue_size``) lets a batch hold pairs degraded in different batches. Its queue must be a
multiple of the batch size, which an elastic run, whose per-rank batch changes with the world
size, cannot promise. This pool is a ring of single pairs instead, so any batch size meets any
pool size: while it fills, each batch passes through unchanged and its pairs are copied in; once
full, ``min(batch, pool)`` randomly chosen positions of the batch trade places with as many
randomly chosen slots (Real-ESRGAN's exchange of a shuffled queue's first ``b`` entries, where
``b <= pool``). Everything of one pair (LR, HR, any other per-sample tensor) moves as a unit.
The pool lives on the device; a run checkpoint holds it (:meth:`PairPool.state_dict`), so a resumed run
mixes the pairs the uninterrupted one would (Real-ESRGAN's queue refills after a restart).
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

    def state_dict(self) -> dict:
        """The pool on the CPU, as ``torch.load(weights_only=True)`` reads it: its generator's state, the
        fill count and the slots, as uint8 where they hold 8-bit levels exactly (LR and GT pairs do: a
        quarter of the bytes in the checkpoint), else as they are."""
        slots = None if self.slots is None else [_as_levels(s) for s in self.slots]
        return {"rng": self.rng.bit_generator.state, "filled": self.filled, "slots": slots}

    def load_state_dict(self, saved: dict, device: torch.device) -> None:
        self.rng.bit_generator.state = saved["rng"]
        self.filled = int(saved["filled"])
        self.slots = None if saved["slots"] is None else [
            (s.to(device).float() / 255.0 if s.dtype == torch.uint8 else s.to(device)) for s in saved["slots"]]


def _as_levels(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the CPU as uint8 ``round(t·255)`` when that gives ``t`` back bit for bit, else as it is."""
    levels = t.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
    return levels.cpu() if t.dtype == torch.float32 and torch.equal(levels.float() / 255.0, t) else t.cpu()
