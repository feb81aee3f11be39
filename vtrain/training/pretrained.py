"""A recipe's reference checkpoint, downloaded into ``paths.weights_dir`` when it is missing, as torch.hub and timm
fetch their weights.

The URL is the recipe's ``pretrained_url`` (the one place that says where a release is published). The hash is the
one its published file name carries: the hex digits after the last ``-`` are the first digits of the file's sha256
(torch.hub's ``HASH_REGEX``, checked by ``load_state_dict_from_url(check_hash=True)``; torchvision's
``resnet50-0676ba61.pth`` and OpenMMLab's ``resnet50_v1c-2cccc1ad.pth`` are named so). A file name without them (the
Swin releases: ``swin_tiny_patch4_window7_224.pth``) has no published hash, and only the download's completeness is
checked. The file is written whole or not at all (:func:`vtrain.training.atomic.replacing`), with torch.hub's
progress bar on stderr; a lock beside it lets one process of a run (or of several runs sharing the directory)
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

import torch.hub

from vtrain.training.atomic import replacing

log = logging.getLogger("vtrain")


def published_hash(url: str) -> str | None:
    """The sha256 prefix a published file name carries (``resnet50-0676ba61.pth``: ``0676ba61``), or None."""
    found = torch.hub.HASH_REGEX.search(Path(urlparse(url).path).name)
    return found.group(1) or None if found else None


def download_weights(url: str, path: Path) -> str | None:
    """Download ``url`` to ``path`` unless it is there; None once it is, else why not (a clause of one line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when closed, or by the kernel when the process dies
        if path.is_file():  # another process downloaded it while this one waited
            return None
        return _download(url, path)
    finally:
        os.close(lock)


class _HashMismatch(ValueError):
    pass


def _download(url: str, path: Path) -> str | None:
    expected = published_hash(url)
    log.info("downloading %s to %s (%s)", url, path,
             f"sha256 checked against {expected}" if expected else "no published hash: not checked")
    try:
        with replacing(path) as tmp:  # the block raising removes the temporary file, and path is never written
            torch.hub.download_url_to_file(url, str(tmp), progress=True)
            if expected:
                with open(tmp, "rb") as f:
                    digest = hashlib.file_digest(f, "sha256").hexdigest()
                if not digest.startswith(expected):
                    raise _HashMismatch(f"hash mismatch: expected {expected} got {digest}, file removed")
    except _HashMismatch as e:
        return str(e)
    except HTTPError as e:  # the server answered with an error status: "HTTP Error 404: Not Found"
        return f"its download from {url} failed: {e}"
    except URLError as e:  # no network, no such host, the connection refused
        return f"its download from {url} failed: {e.reason}"
    except (OSError, HTTPException) as e:  # the connection cut mid-file (IncompleteRead), a full disk
        return f"its download from {url} failed: {e!r}"
    return None
