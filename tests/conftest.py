"""Shared fixtures: a real S3 endpoint (moto's HTTP server on loopback) and test images."""

from __future__ import annotations

import os
import socket
import uuid

import numpy as np
import pytest


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Test networks are tiny: intra-op threads only add overhead on a 2-core machine."""
    import torch
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1; AWS_* variables point boto3 (and raysr) at it."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in
             ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing",
                      AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    import raysr.io
    raysr.io._clients.clear()
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    raysr.io._clients.clear()


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    """A fresh, empty bucket on the moto server; returns its name."""
    import raysr.io
    name = f"raysr-test-{uuid.uuid4().hex[:12]}"
    raysr.io.s3_client().create_bucket(Bucket=name)
    return name


def synthetic_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A photo-like uint8 RGB image (H, W, 3): smooth gradients, edges and texture.

    Pure noise would make every SR comparison degenerate; this has structure at
    several scales, like a natural image, and is fully determined by the seed.
    """
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    img = np.zeros((height, width, 3))
    for c in range(3):
        fx, fy = rng.uniform(0.5, 4.0, 2) * 2 * np.pi / max(height, width)
        img[..., c] = 0.5 + 0.25 * np.sin(fx * x + rng.uniform(0, 6)) * np.cos(fy * y + rng.uniform(0, 6))
    for _ in range(6):  # a few hard-edged shapes
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        r = rng.uniform(0.05, 0.3) * min(height, width)
        mask = (y - cy) ** 2 + (x - cx) ** 2 < r ** 2
        img[mask] = rng.uniform(0, 1, 3)
    img += rng.normal(0, 0.03, img.shape)  # fine texture
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


@pytest.fixture
def make_image():
    return synthetic_image
