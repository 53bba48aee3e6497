"""Pretrained weights on demand: torchvision's ImageNet files and `https://...#sha256=` URLs,
downloaded once per node into the torch hub cache ($TORCH_HOME/hub/checkpoints).

A download is written to a partial file beside its destination, its sha256 checked (the whole
digest of a URL's `#sha256=`; for torchvision's files the prefix their names carry, which is
what `torch.hub.load_state_dict_from_url(check_hash=True)` checks) and only then renamed into
place: a refused connection, a transfer cut short or a wrong file leaves nothing in the cache
and is one line naming the URL and the fix. A file lock beside it makes the node's other
processes (trials, the pre-flight) wait for that one download and then read the same file.
`SEGTUNE_WEIGHTS_MIRROR=http://host/path` replaces download.pytorch.org for torchvision's files,
for clusters without internet access (the mirror serves them under their own names).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from filelock import FileLock, Timeout
from torch.hub import HASH_REGEX

from segtune.config.trial import WEIGHTS_MIRROR_ENV, weights_url
from segtune.errors import ModelError

log = logging.getLogger(__name__)

TIMEOUT_S = 30.0  # for the connection and for each read: a server that stops sending fails
CHUNK = 1 << 20


@dataclass(frozen=True)
class Download:
    """A file to fetch into the hub cache, and how to word its failure."""

    what: str  # e.g. `pretrained: imagenet weights for resnet18`
    url: str
    path: Path
    sha256: str  # the whole hex digest, or the prefix of it that a torchvision file name holds
    fix: str


def checkpoints_dir() -> Path:
    """torch hub's cache of weights files, where torchvision itself would put its files."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def torchvision_download(backbone: str, url: str) -> Download:
    """torchvision's file at `url`, or under the same name at the mirror when one is set."""
    name = Path(urlparse(url).path).name
    path = checkpoints_dir() / name
    found = HASH_REGEX.search(name)
    mirror = os.environ.get(WEIGHTS_MIRROR_ENV, "").strip().rstrip("/")
    if mirror:
        url = f"{mirror}/{name}"
        reach = f"check that {WEIGHTS_MIRROR_ENV}={mirror} serves torchvision's file {name}"
    else:
        reach = (
            "give this node internet access, or set "
            f"{WEIGHTS_MIRROR_ENV}=http://host/path to a mirror serving torchvision's files"
        )
    return Download(
        f"pretrained: imagenet weights for {backbone}",
        url,
        path,
        found.group(1) if found else "",
        f"{reach}; or place the file at {path}; or use pretrained: none",
    )


def url_download(pretrained: str) -> Download | None:
    """The file of `pretrained: https://host/w.pth#sha256=HEX`, cached under a name keyed by
    its hash (`w-HEX.pth`); None when `pretrained` is no URL."""
    found = weights_url(pretrained)
    if found is None:
        return None
    url, sha256 = found
    name = Path(urlparse(url).path)
    path = checkpoints_dir() / f"{name.stem or 'weights'}-{sha256}{name.suffix or '.pth'}"
    return Download(
        "pretrained",
        url,
        path,
        sha256,
        "check the URL and the sha256 of its file (sha256sum FILE); or use pretrained: none",
    )


def fetch(download: Download) -> Path:
    """The file in the hub cache, downloaded first when it is missing (once per node)."""
    path = download.path
    if path.is_file():
        return path
    with _node_lock(download):
        if path.is_file():
            log.info("%s was downloaded meanwhile by another process of this node", path)
            return path
        for stale in path.parent.glob(f".{path.name}.partial-*"):  # a killed download's
            stale.unlink(missing_ok=True)
        partial = path.parent / f".{path.name}.partial-{os.getpid()}"
        try:
            _download(download, partial)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
    return path


@contextlib.contextmanager
def _node_lock(download: Download) -> Iterator[None]:
    """The node's lock on one file of the cache (fcntl, released by the OS if its holder dies);
    a process that has to wait for it says so."""
    folder = download.path.parent
    lock = FileLock(folder / f".{download.path.name}.lock")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info("waiting for another process of this node to download %s", download.url)
            lock.acquire()
    except OSError as exc:
        raise ModelError(
            f"{download.what}: cannot write to the torch hub cache {folder} ({exc}); "
            "set TORCH_HOME to a writable folder"
        ) from None
    try:
        yield
    finally:
        lock.release()


def _download(download: Download, partial: Path) -> None:
    """`download.url` into `partial`, checked; a failure is one ModelError line."""
    started = time.perf_counter()
    log.info("downloading %s to %s", download.url, download.path)
    digest, size = hashlib.sha256(), 0
    request = urllib.request.Request(download.url, headers={"User-Agent": "segtune"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as answer, partial.open("wb") as f:
            length = answer.headers.get("Content-Length")
            while chunk := answer.read(CHUNK):
                f.write(chunk)
                digest.update(chunk)
                size += len(chunk)
        if length is not None and size != int(length):
            reason = f"the transfer stopped after {size} of {length} bytes"
        elif not digest.hexdigest().startswith(download.sha256):
            reason = f"its sha256 {digest.hexdigest()} does not start with {download.sha256}"
        else:
            reason = ""
    except urllib.error.HTTPError as exc:
        reason = f"HTTP {exc.code} {exc.reason}"
    except urllib.error.URLError as exc:
        reason = str(getattr(exc.reason, "strerror", None) or exc.reason)
    except (OSError, http.client.HTTPException) as exc:  # a reset or a read that timed out
        reason = str(exc) or type(exc).__name__
    if reason:
        raise ModelError(
            f"{download.what}: cannot download {download.url} ({reason}); {download.fix}"
        )
    log.info(
        "downloaded %.1f MB in %.1f s: %s", size / 1e6, time.perf_counter() - started, download.path
    )
