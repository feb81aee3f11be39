"""A recipe's reference checkpoint, downloaded into ``paths.weights_dir`` when it is missing, as torch.hub and timm
fetch their weights.

The URL is the recipe's ``pretrained_url`` (the one place that says where a release is published). The hash is the
one its published file name carries: the hex digits after the last ``-`` are the first digits of the file's sha256
(torch.hub's ``HASH_REGEX``, checked by ``load_state_dict_from_url(check_hash=True)``; torchvision's
``resnet50-0676ba61.pth`` and OpenMMLab's ``resnet50_v1c-2cccc1ad.pth`` are named so). A file name without them (the
Swin releases: ``swin_tiny_patch4_window7_224.pth``) has no published hash, and only the download's completeness is
checked. The file is written whole or not at all (:func:`vtrain.training.atomic.replacing`; a body shorter than
its ``Content-Length`` is refused), with a progress bar on stderr as torch.hub's; a lock beside it lets one process of a run (or of several runs sharing the directory)
download it while the others wait for it.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
from http.client import HTTPException
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import urlparse
from urllib.request import Request, urlopen

import torch.hub
from tqdm import tqdm  # Lightning's progress bars' package

from vtrain.training.atomic import replacing

log = logging.getLogger("vtrain")


def published_hash(url: str) -> str | None:
    """The sha256 prefix a published file name carries (``resnet50-0676ba61.pth``: ``0676ba61``), or None."""
    found = torch.hub.HASH_REGEX.search(Path(urlparse(url).path).name)
    return found.group(1) or None if found else None


def download_weights(url: str, path: Path) -> str | None:
    """Download ``url`` to ``path`` unless it is there; None once it is, else why not (a clause of one line)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:  # a read-only or foreign weights directory
        return f"it cannot be downloaded into {path.parent}: {e.strerror}"
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when closed, or by the kernel when the process dies
        if path.is_file():  # another process downloaded it while this one waited
            return None
        return _download(url, path)
    finally:
        os.close(lock)


CHUNK = 1 << 20
TIMEOUT_S = 60  # of each connect and read: a network that drops packets ends in one line, not a hang


class _Refused(ValueError):
    """The file arrived, but is not the published one: cut short, or another hash."""


def _download(url: str, path: Path) -> str | None:
    expected = published_hash(url)
    log.info("downloading %s to %s (%s)", url, path,
             f"sha256 checked against {expected}" if expected else "no published hash: not checked")
    try:
        with replacing(path) as tmp:  # the block raising removes the temporary file, and path is never written
            digest = _fetch(url, tmp, path.name)
            if expected and not digest.startswith(expected):
                raise _Refused(f"hash mismatch: expected {expected} got {digest}, file removed")
    except _Refused as e:
        return str(e)
    except HTTPError as e:  # the server answered with an error status: "HTTP Error 404: Not Found"
        return f"its download from {url} failed: {e}"
    except URLError as e:  # no network, no such host, the connection refused
        return f"its download from {url} failed: {e.reason}"
    except (OSError, HTTPException) as e:  # a timeout, a full disk
        return f"its download from {url} failed: {e!r}"
    return None


def _fetch(url: str, tmp: Path, name: str) -> str:
    """Stream ``url`` into ``tmp`` with a progress bar on stderr, as torch.hub's ``download_url_to_file`` does, and
    return its sha256. Unlike that function, a body shorter than its ``Content-Length`` (a connection dropped
    mid-file, which ``http.client`` reads as the end) is refused."""
    with urlopen(Request(url, headers={"User-Agent": "vtrain"}), timeout=TIMEOUT_S) as response, \
            open(tmp, "wb") as f:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        digest = hashlib.sha256()
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name) as bar:
            while chunk := response.read(CHUNK):
                f.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
        if total is not None and f.tell() != total:
            raise _Refused(f"its download from {url} ended after {f.tell()} of {total} bytes, file removed")
    return digest.hexdigest()
