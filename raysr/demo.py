"""Demo data for ``python -m raysr.train`` with no data configured.

scikit-image ships a handful of photographs in its package (``skimage/data``);
they are cut into shards once per run folder, so the default command trains on
real images with no download. Two photos are held out for validation.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

# Photos (and a few grey textures, converted to RGB when decoded) that make the training set.
TRAIN_PHOTOS = ("astronaut.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png", "motorcycle_left.png",
                "retina.jpg", "brick.png", "grass.png", "gravel.png", "camera.png", "color.png")
# Held out: never cut into training shards.
VAL_PHOTOS = ("chelsea.png", "rocket.jpg")
# Sub-images as BasicSR makes them from DIV2K, scaled to these small photos.
DEMO_CROP, DEMO_STEP = 192, 96


def sample_photo_dir() -> Path:
    """Where scikit-image keeps its sample photographs (found without importing it)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the demo data comes from scikit-image's sample photos, but scikit-image is not "
                           "installed: pip install scikit-image, or set data.train and data.val")
    folder = Path(next(iter(spec.submodule_search_locations)), "data")
    missing = [n for n in TRAIN_PHOTOS + VAL_PHOTOS if not (folder / n).is_file()]
    if missing:
        raise RuntimeError(f"scikit-image at {folder} lacks the sample photos {missing}; reinstall it, "
                           "or set data.train and data.val")
    return folder


def build_demo_data(root: str) -> tuple[str, str]:
    """Shards of the training photos and a folder of validation photos under ``root``.

    root: a local directory or an s3:// prefix (so that every node of a cluster
    can read the demo data). Returns ``(shard_dir, val_dir)``. Re-running reuses
    what is there: nothing is rebuilt once the manifest exists.
    """
    import tempfile

    from raysr import storage
    from raysr.data.make_shards import make_shards
    from raysr.data.manifest import manifest_uri

    source = sample_photo_dir()
    shard_dir, val_dir = storage.join(root, "shards"), storage.join(root, "val")
    for name in VAL_PHOTOS:
        target = storage.join(val_dir, name)
        if not storage.exists(target):
            storage.write_bytes(target, (source / name).read_bytes())
    if not storage.exists(manifest_uri(shard_dir)):
        print(f"raysr: building demo shards from scikit-image's sample photos in {shard_dir}", flush=True)
        with tempfile.TemporaryDirectory(prefix="raysr_demo_") as photos:
            for name in TRAIN_PHOTOS:
                shutil.copyfile(source / name, Path(photos, name))
            make_shards([photos], shard_dir, crop_size=DEMO_CROP, step=DEMO_STEP, min_size=64,
                        workers=min(2, os.cpu_count() or 1), progress=False)
    return shard_dir, val_dir
