"""A resume's data fast-forward: the time to the first batch of a loader made at ``consumed=N``
(raysr.data.make_train_loader), against reading those N batches, on the demo shards.

    python bench/resume_fast_forward.py 100      # N = 100; gt_size 128, batch 16, one process
"""

import os
import sys
import time

from raysr.data import make_train_loader
from raysr.demo import build_demo_data

ARGS = dict(gt_size=128, scale=4, batch_size=16, num_workers=0, seed=0, batches_per_epoch=10**6)


def first_batch_s(shards: list[str], consumed: int) -> float:
    loader = make_train_loader(shards, consumed=consumed, **ARGS)
    start = time.perf_counter()
    next(loader.host_batches())
    elapsed = time.perf_counter() - start
    loader.close()
    return elapsed


def main(n: int) -> None:
    train, _ = build_demo_data("/tmp/raysr_resume_bench")
    batches = make_train_loader(train, **ARGS).host_batches()
    start = time.perf_counter()
    for _ in range(n + 1):
        next(batches)
    read = time.perf_counter() - start
    print(f"{n + 1} batches read: {read:.2f} s; first batch at consumed=0: {first_batch_s(train, 0):.2f} s, "
          f"at consumed={n}: {first_batch_s(train, n):.2f} s (load {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100)
