"""Pretrained weights fetched the way torchvision fetches them: once, into the torch hub cache, verified.

    path = fetch("https://download.pytorch.org/models/vgg19-dcbb9e9d.pth")   # -> ~/.cache/torch/hub/checkpoints/…

An http(s) URL is downloaded into ``$TORCH_HOME/hub/checkpoints/<file name>`` unless it is
there already, by ``torch.hub.download_url_to_file`` with ``load_state_dict_from_url(check_hash=True)``'s
check: the hex digits after the last ``-`` of the file name (``dcbb9e9d``) must begin the
file's SHA-256. torch downloads into a temporary file beside the target and moves it into
place only once verified, so a wrong file or a cut connection (caught by the hash, or for a name
without one by the length the server announced) never leaves anything in the cache. Local paths and ``s3://`` URIs are returned as they are (their
readers open them).

``RAYSR_OFFLINE=1`` (or a machine that cannot reach the URL) turns a missing cache entry
into :class:`WeightsUnavailable`, whose message names the file to copy and where.
"""

from __future__ import annotations

import os
import re
import urllib.error
from pathlib import Path
from urllib.parse import urlparse


class WeightsUnavailable(FileNotFoundError):
    """Weights are neither cached nor downloadable here (offline, or the URL cannot be reached)."""


class WeightsHashError(ValueError):
    """A downloaded file's SHA-256 does not start with the prefix in its name; nothing was cached."""


def offline() -> bool:
    """Whether ``RAYSR_OFFLINE`` asks raysr never to download."""
    return os.environ.get("RAYSR_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def is_url(source: str | os.PathLike) -> bool:
    return str(source).startswith(("http://", "https://"))


def cache_path(url: str) -> Path:
    """Where torch.hub keeps ``url``: ``$TORCH_HOME/hub/checkpoints/<file name>``."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def fetch(source: str | os.PathLike, what: str = "weights") -> str:
    """A local path (or s3:// URI) from which to read ``source``; http(s) URLs are downloaded once.

    what: what the file is, for messages ("VGG19 ImageNet weights"). Raises
    :class:`WeightsUnavailable` (offline / unreachable, naming the file to copy),
    :class:`WeightsHashError` (corrupt or wrong file; nothing cached).
    """
    if not is_url(source):
        return str(source)
    url = str(source)
    target = cache_path(url)
    if target.is_file():
        return str(target)
    copy_it = (f"copy {target.name} (from {url}, or from the torch hub cache of a machine that has it) "
               f"into {target.parent}/, or point to a local path or s3:// URI instead")
    if offline():
        raise WeightsUnavailable(f"{target.name} ({what}) is not in the torch hub cache ({target.parent}) and "
                                 f"RAYSR_OFFLINE is set; {copy_it}")
    try:
        _download(url, target, what)
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise WeightsUnavailable(f"cannot download {what} from {url} ({reason}); on a machine without internet "
                                 f"{copy_it}") from err
    return str(target)


# torch's message when the hash does not match: 'invalid hash value (expected "<prefix>", got "<sha256>")'
TORCH_HASH_ERROR = re.compile(r'invalid hash value \(expected "([0-9a-f]*)", got "([0-9a-f]*)"\)')


TIMEOUT_S = 60  # a stalled connection ends the download (torch.hub sets no timeout of its own)


def _download(url: str, target: Path, what: str) -> None:
    """``url`` into ``target`` through torch.hub, with the hash check of the file name's prefix.

    What torch.hub does not do, done here: a socket timeout (a stalled server would hang a worker
    forever), and for a file name without a hash the length checked against the server's
    Content-Length (a cut connection would otherwise cache a truncated file; with a hash, the
    hash catches it). The progress bar only on a terminal (not in the logs of Ray's workers).
    """
    import socket
    import sys

    import torch

    target.parent.mkdir(parents=True, exist_ok=True)
    # torch.hub.load_state_dict_from_url's own reading of the file name's hash prefix
    match = torch.hub.HASH_REGEX.search(target.name)
    saved_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(TIMEOUT_S)  # urllib's sockets inside torch.hub take the default
    try:
        expected = None if match else _content_length(url)
        torch.hub.download_url_to_file(url, str(target), hash_prefix=match.group(1) if match else None,
                                       progress=sys.stderr.isatty())
    except RuntimeError as err:
        wrong = TORCH_HASH_ERROR.search(str(err))
        if wrong is None:
            raise
        raise WeightsHashError(f"{what} downloaded from {url} are corrupt or not the published file: SHA-256 "
                               f"{wrong.group(2)} does not start with {wrong.group(1)} (the hash in the file "
                               "name); nothing was cached. Download again, or check the URL") from err
    finally:
        socket.setdefaulttimeout(saved_timeout)
    if expected is not None and target.stat().st_size != expected:
        got = target.stat().st_size
        target.unlink()
        raise OSError(f"the download was cut short: {got} of {expected} bytes")


def _content_length(url: str) -> int | None:
    """The size the server announces for ``url`` (a HEAD request), or None when it announces none."""
    import urllib.request

    with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=TIMEOUT_S) as reply:
        length = reply.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None
