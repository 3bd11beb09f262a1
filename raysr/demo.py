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

    Returns ``(shard_dir, val_dir)``. Re-running reuses what is there: the shard
    writer skips shards whose checksum matches the manifest.
    """
    from raysr.data.make_shards import make_shards

    source = sample_photo_dir()
    root_path = Path(root)
    photos, val_dir, shard_dir = root_path / "photos", root_path / "val", root_path / "shards"
    for folder, names in ((photos, TRAIN_PHOTOS), (val_dir, VAL_PHOTOS)):
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            if not (folder / name).exists():
                shutil.copyfile(source / name, folder / name)
    if not (shard_dir / "manifest.parquet").exists():
        print(f"raysr: building demo shards from scikit-image's sample photos in {shard_dir}", flush=True)
        make_shards([str(photos)], str(shard_dir), crop_size=DEMO_CROP, step=DEMO_STEP, min_size=64,
                    workers=min(2, os.cpu_count() or 1), progress=False)
    return str(shard_dir), str(val_dir)
