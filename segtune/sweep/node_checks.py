"""Every node of the Ray cluster checked before the first trial: the same dataset, the same run
storage, a reachable tracking server, the same versions as the driver, and the pretrained
weights the sweep needs, downloaded into the node's hub cache (segtune.models.weights).

One small task pinned to each alive node reports what it sees; the driver compares, and every
problem becomes one line naming the node, the key and the fix. A cluster of one node, the
driver's own, needs no task: the driver's pre-flight already looked at that machine.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import ipaddress
import logging
import secrets
import socket
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from segtune.config.trial import DataConfig
from segtune.data.dataset import fingerprint
from segtune.data.pipeline import cache_room, ensure_dataset
from segtune.errors import ConfigError, SegtuneError, problems_message
from segtune.sweep.preflight import fetch_weights
from segtune.sweep.storage import RunStorage
from segtune.tracking.address import public_uri, server_health

log = logging.getLogger(__name__)

# what trials and their data depend on (pillow and numpy write the synthetic sets)
PACKAGES = ("segtune", "torch", "torchvision", "ray", "mlflow", "numpy", "pillow")
MARKER_DIR = ".segtune-preflight"
TIMEOUT_S = 300  # a node that does not answer by then is reported, not waited for


def node_name() -> str:
    """How runs and messages name the node this process runs on: `IP (hostname)`."""
    return f"{ray.util.get_node_ip_address()} ({socket.gethostname()})"


def versions() -> dict[str, str]:
    found = {}
    for package in PACKAGES:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def _is_loopback(host: str | None) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _inspect(
    data: DataConfig,
    storage: RunStorage,
    marker: str,
    token: str,
    uri: str,
    weights: Sequence[tuple[str, str]] = (),
) -> dict:
    """What one node sees; runs there as a Ray task. `weights`: (pretrained, backbone) of each
    download the sweep needs, fetched here so that the node's trials find them."""
    report: dict[str, Any] = {"node": node_name(), "versions": versions()}
    try:
        fetch_weights(weights)
    except SegtuneError as exc:
        report["weights_error"] = str(exc)
    try:
        report["dataset"] = fingerprint(ensure_dataset(data, progress=False))
        report["cache_room"] = cache_room(data)
    except SegtuneError as exc:
        report["dataset_error"] = str(exc)
    try:
        report["marker_seen"] = storage.read_text(MARKER_DIR, marker) == token
        mine = f"{marker}-{ray.get_runtime_context().get_node_id()}"
        storage.write_text(token, MARKER_DIR, mine)  # a node writes checkpoints there too
        storage.delete(MARKER_DIR, mine)
    except SegtuneError as exc:
        report["storage_error"] = str(exc)
    report["tracking_error"] = server_health(uri)
    return report


def check_nodes(
    data: DataConfig,
    storage: RunStorage,
    tracking_uri: str,
    joined: bool = True,
    weights: Sequence[tuple[str, str]] = (),
) -> None:
    """Check every alive node and fetch there the `weights` the sweep needs (preflight's
    `needed_weights`). Raises one ConfigError with every problem found, before any MLflow
    run exists.

    `joined`: the driver joined a cluster (--address); nodes may join it later, so even a
    cluster of one node gets the checks a cluster needs. A Ray started by the driver on its
    own machine is checked by the driver's own pre-flight.
    """
    nodes = [n for n in ray.nodes() if n["Alive"]]
    names = [n["NodeManagerAddress"] for n in nodes]
    if not joined and len(nodes) == 1:
        return
    started = time.perf_counter()
    problems: list[str] = []
    multi = len(nodes) > 1 or joined
    scheme = urlsplit(tracking_uri).scheme
    host = urlsplit(tracking_uri).hostname
    if multi and scheme in ("", "file", "sqlite"):
        problems.append(
            f"--tracking-uri {public_uri(tracking_uri)}: a store on one node's disk; each node of the "
            "cluster would write its own. Run an MLflow server on the head "
            "(mlflow server --host HEAD_IP --serve-artifacts) and pass --tracking-uri "
            "http://HEAD_IP:5000"
        )
    elif multi and _is_loopback(host) and not all(_is_loopback(n) for n in names):
        problems.append(
            f"--tracking-uri {public_uri(tracking_uri)}: a loopback address, which no other node reaches; "
            "use the head's private address"
        )
    marker, token = f"check-{secrets.token_hex(4)}", secrets.token_hex(8)
    storage.write_text(token, MARKER_DIR, marker)
    expected = {"dataset": fingerprint(ensure_dataset(data, progress=False)), **versions()}
    task = ray.remote(num_cpus=0, max_retries=0)(_inspect)
    pending = {
        task.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(data, storage, marker, token, tracking_uri, weights): n["NodeManagerAddress"]
        for n in nodes
    }
    ready, late = ray.wait(list(pending), num_returns=len(pending), timeout=TIMEOUT_S)
    for ref in late:
        problems.append(
            f"node {pending[ref]}: did not answer the pre-flight in {TIMEOUT_S} s; check that "
            "its raylet runs and that it can start a Python worker (ray status)"
        )
    for ref in ready:
        try:
            report = ray.get(ref)
        except ray.exceptions.RayError as exc:
            problems.append(
                f"node {pending[ref]}: the pre-flight task failed ({str(exc).splitlines()[0]}); "
                "install segtune there as on the driver (pip install -c constraints.txt -e .)"
            )
            continue
        problems.extend(_problems(report, expected, data, storage, tracking_uri))
    with contextlib.suppress(SegtuneError):  # markers left behind are harmless
        storage.delete(MARKER_DIR, marker)
    log.info("pre-flight of %d nodes took %.1f s", len(nodes), time.perf_counter() - started)
    if problems:
        raise ConfigError(
            problems_message(f"the cluster cannot run this sweep ({len(nodes)} nodes)", problems)
        )


def _problems(
    report: dict, expected: dict, data: DataConfig, storage: RunStorage, uri: str
) -> list[str]:
    node, found = f"node {report['node']}", []
    if "dataset_error" in report:
        found.append(
            f"{node}: data.root {data.root}: {report['dataset_error']}; every node needs the "
            "same dataset at that path (a shared mount, or a copy), or use data.synthetic"
        )
    elif report["dataset"] != expected["dataset"]:
        found.append(
            f"{node}: data.root {data.root} holds another dataset than the driver's (file "
            "names and sizes differ); copy the same dataset to every node"
        )
    if "weights_error" in report:
        found.append(f"{node}: {report['weights_error']}")  # names the URL and the fix
    if report.get("cache_room"):
        found.append(f"{node}: {report['cache_room']}")  # names the folder and the fix
    if "storage_error" in report:
        found.append(f"{node}: {report['storage_error']}")  # names the key and the fix
    elif not report["marker_seen"]:
        found.append(
            f"{node}: tune.storage_path {storage} is not the driver's storage (a file the driver "
            "wrote there is not visible); use a folder every node mounts at the same path (NFS) "
            "or an s3://bucket/prefix URI (tune.storage_endpoint for MinIO/Ceph)"
        )
    if report["tracking_error"]:
        found.append(
            f"{node}: --tracking-uri {public_uri(uri)}: {report['tracking_error']}; start the server on an "
            "address this node reaches (mlflow server --host HEAD_PRIVATE_IP)"
        )
    for package, version in report["versions"].items():
        if version != expected[package]:
            found.append(
                f"{node}: {package} {version}, but the driver has {expected[package]}; install "
                "the same versions everywhere (pip install -c constraints.txt)"
            )
    return found
