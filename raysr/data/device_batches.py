"""A rank's training batches on its device: the loader's CPU batches copied over and finished there."""

from __future__ import annotations

import torch


class DeviceBatches:
    """Endless ``(lr, hr)`` float32 batches on ``device`` from a :class:`raysr.data.TrainLoader`.

    lr_on ``"device"``: the loader ships uint8 HR crops and their flip/rot90 symmetries; here,
    on the device, they are flipped (one gather), made float and LR = :func:`raysr.data.make_lr`
    (:meth:`raysr.data.stream.HostBatch.finish`). ``"loader"``: both come finished and are copied
    (non-blocking, from pinned memory). ``degrade`` (``data.degradation=realesrgan``): a
    :class:`raysr.degradation.TrainingPairs` that turns the loader's (kernels, GT regions) into
    ``(lr, hr, hr_usm)`` here. :meth:`next` returns ``(lr, hr, hr_usm)``, ``hr_usm`` None without ``degrade``.
    """

    def __init__(self, loader, device: torch.device, scale: int, lr_on: str, degrade=None):
        if lr_on != loader.lr_on:
            raise ValueError(f"lr_on={lr_on!r} but the loader was made with lr_on={loader.lr_on!r}; "
                             "pass the same value to make_train_loader and DeviceBatches")
        self.loader, self.device, self.scale, self.lr_on, self.degrade = loader, device, scale, lr_on, degrade
        self._it = loader.host_batches()

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        try:
            batch = next(self._it)
        except StopIteration:  # end of an epoch: the stream is resampled, start the next one
            self._it = self.loader.host_batches()
            batch = next(self._it)
        if self.degrade is not None:  # (kernels, GT regions) -> (lr, hr, hr_usm) by the degradation chain
            return self.degrade(batch.lr, batch.hr)
        lr, hr = batch.finish(self.device, self.scale)
        return lr, hr, None

    def skipped(self) -> int:
        return int(self.loader.stats().get("skipped", 0))

    def samples_seen(self) -> int:
        return int(self.loader.stats().get("samples", 0))

    def close(self) -> None:
        """Stop the DataLoader worker processes."""
        self._it = None
        self.loader.close()
