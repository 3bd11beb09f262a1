"""A rank's training batches on its device: the loader's CPU batches copied over, LR made there if asked."""

from __future__ import annotations

import torch

from raysr.data.stream import make_lr


class DeviceBatches:
    """Endless ``(lr, hr)`` batches on ``device`` from a :class:`raysr.data.TrainLoader`.

    lr_on ``"device"``: the loader ships HR only and LR = :func:`raysr.data.make_lr` is
    computed here, on the device; ``"loader"``: both are copied (non-blocking, from pinned memory).
    ``degrade`` (``data.degradation=realesrgan``): a :class:`raysr.degradation.TrainingPairs` that
    turns the loader's (kernels, GT regions) into ``(lr, hr, hr_usm)`` here.
    :meth:`next` returns ``(lr, hr, hr_usm)``, ``hr_usm`` None without ``degrade``.
    """

    def __init__(self, loader, device: torch.device, scale: int, lr_on: str, degrade=None):
        self.loader, self.device, self.scale, self.lr_on, self.degrade = loader, device, scale, lr_on, degrade
        self._it = iter(loader)

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        try:
            batch = next(self._it)
        except StopIteration:  # end of an epoch: the stream is resampled, start the next one
            self._it = iter(self.loader)
            batch = next(self._it)
        if self.degrade is not None:
            return self.degrade(*batch)
        hr = batch[1].to(self.device, non_blocking=True)
        if self.lr_on == "device":
            return make_lr(hr, self.scale), hr, None
        return batch[0].to(self.device, non_blocking=True), hr, None

    def skipped(self) -> int:
        return int(self.loader.stats().get("skipped", 0))

    def samples_seen(self) -> int:
        return int(self.loader.stats().get("samples", 0))

    def close(self) -> None:
        """Stop the DataLoader worker processes."""
        self._it = None
        self.loader.close()
