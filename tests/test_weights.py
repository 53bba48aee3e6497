"""Pretrained weights on demand (segtune.models.weights), against a real HTTP server on
127.0.0.1 that counts its requests: the mirror of torchvision's files and `URL#sha256=`.

No test needs a real torchvision file: a file served under torchvision's name fails its hash
check (what the refusal tests want), and the tests that load weights serve a state dict in
torchvision's layout by its `URL#sha256=` form, which goes through the same download.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torchvision.models as tvm
from mlflow.tracking import MlflowClient
from torch.hub import HASH_REGEX

from segtune.cli import run_cli
from segtune.config.trial import WEIGHTS_MIRROR_ENV, DataConfig, trial_config
from segtune.errors import ConfigError, ModelError
from segtune.models import build_encoder, encoder_names, pretrained_weights_file
from segtune.models.encoders import imagenet_download
from segtune.run import main as run_main
from segtune.sweep.storage import RunStorage
from tests.helpers import wait_for
from tests.servers import free_port
from tests.test_sweep import run, trial_runs, write_sweep

BACKBONE = "mobilenet_v3_small"  # the smallest registered backbone: a 10 MB file


@dataclass
class WeightsServer:
    """What the server serves (path -> bytes), how, and the paths it was asked for."""

    files: dict[str, bytes]
    url: str = ""
    requests: list[str] = field(default_factory=list)
    cut: set[str] = field(default_factory=set)  # paths sent half, then the connection closes
    hold: threading.Event = field(default_factory=threading.Event)  # set: send everything


@contextlib.contextmanager
def weights_server(files: dict[str, bytes]) -> Iterator[WeightsServer]:
    """A static file server on 127.0.0.1 that also answers /health (as a tracking server
    would). With `hold` clear, a file's first half goes out at once and the rest only once
    the test sets it."""
    served = WeightsServer(files)
    served.hold.set()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/health":
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"OK")
                return
            served.requests.append(self.path)
            body = served.files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            half = len(body) // 2
            self.wfile.write(body[:half])
            self.wfile.flush()
            if self.path in served.cut:
                return  # HTTP/1.0: the connection closes after half the announced bytes
            served.hold.wait(timeout=120)
            self.wfile.write(body[half:])

        def log_message(self, format: str, *args: object) -> None:  # quiet test output
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    served.url = f"http://127.0.0.1:{server.server_port}"
    try:
        yield served
    finally:
        served.hold.set()
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(scope="module")
def weights() -> tuple[dict[str, torch.Tensor], bytes]:
    """A torchvision-layout state dict of the backbone (its own random init) and its bytes."""
    torch.manual_seed(7)
    state = getattr(tvm, BACKBONE)().state_dict()
    with tempfile.TemporaryFile() as f:
        torch.save(state, f)
        f.seek(0)
        return state, f.read()


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv(WEIGHTS_MIRROR_ENV, raising=False)
    return tmp_path / "torch-home" / "hub" / "checkpoints"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cached(folder: Path) -> list[str]:
    """What the cache holds besides the lock files (a lock is an empty file, kept on purpose)."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


def assert_loaded(encoder: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = encoder.state_dict()
    convs = [k for k, v in state.items() if v.ndim == 4]
    assert convs and all(torch.equal(own[k], state[k]) for k in convs)


def test_every_registered_file_name_carries_its_hash_prefix() -> None:
    """torch hub's check needs it: a name without one would be taken unchecked."""
    for name in encoder_names():
        download = imagenet_download(name)
        found = HASH_REGEX.search(download.path.name)
        assert found and len(found.group(1)) >= 8 and download.sha256 == found.group(1), name


def test_a_url_without_its_sha256_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        trial_config({"pretrained": "https://host/w.pth"})
    message = str(info.value)
    assert "pretrained" in message and "#sha256=<64 hex digits>" in message
    assert len(message.splitlines()) == 1
    digest = "ab" * 32
    url = f"https://host/w.pth#sha256={digest.upper()}"
    assert trial_config({"pretrained": url}).pretrained == url


def test_a_url_loads_once_into_the_hub_cache_under_its_hash(
    weights: tuple[dict[str, torch.Tensor], bytes], torch_home: Path
) -> None:
    state, data = weights
    with weights_server({"/w/enc.pth": data}) as server:
        pretrained = f"{server.url}/w/enc.pth#sha256={sha256(data)}"
        assert_loaded(build_encoder(BACKBONE, pretrained), state)
        assert_loaded(build_encoder(BACKBONE, pretrained), state)  # from the cache
    assert server.requests == ["/w/enc.pth"]
    assert cached(torch_home) == [f"enc-{sha256(data)}.pth"]


@pytest.mark.parametrize("case", ["wrong hash at the mirror", "cut short", "404", "wrong sha256"])
def test_a_failed_download_is_one_line_and_leaves_nothing(
    case: str, weights: tuple[dict[str, torch.Tensor], bytes], torch_home: Path
) -> None:
    _, data = weights
    tv_name = pretrained_weights_file("resnet18").name  # resnet18-f37072fd.pth
    files = {f"/mirror/{tv_name}": data, "/w.pth": data}
    with weights_server(files) as server, pytest.MonkeyPatch.context() as env:
        if case == "wrong hash at the mirror":  # torchvision's name, another file's bytes
            env.setenv(WEIGHTS_MIRROR_ENV, f"{server.url}/mirror")
            backbone, pretrained, path = "resnet18", "imagenet", f"/mirror/{tv_name}"
            said = f"does not start with {imagenet_download('resnet18').sha256}"
        else:
            digest = "0" * 64 if case == "wrong sha256" else sha256(data)
            path = "/w.pth" if case != "404" else "/gone.pth"
            backbone, pretrained = BACKBONE, f"{server.url}{path}#sha256={digest}"
            said = {
                "cut short": f"the transfer stopped after {len(data) // 2} of {len(data)} bytes",
                "404": "HTTP 404",
                "wrong sha256": f"its sha256 {sha256(data)} does not start with {digest}",
            }[case]
        if case == "cut short":
            server.cut.add("/w.pth")
        with pytest.raises(ModelError) as info:
            build_encoder(backbone, pretrained)
    message = str(info.value)
    assert len(message.splitlines()) == 1 and said in message, message
    assert f"cannot download {server.url}{path} (" in message
    assert ("SEGTUNE_WEIGHTS_MIRROR=" in message) == (case == "wrong hash at the mirror")
    assert server.requests == [path]
    assert cached(torch_home) == []  # no file, no partial


def test_no_server_answering_is_one_line_within_seconds(torch_home: Path) -> None:
    os.environ[WEIGHTS_MIRROR_ENV] = mirror = f"http://127.0.0.1:{free_port()}"
    try:
        started = time.monotonic()
        with pytest.raises(ModelError) as info:
            build_encoder("resnet18", "imagenet")
        took = time.monotonic() - started
    finally:
        del os.environ[WEIGHTS_MIRROR_ENV]
    message = str(info.value)
    assert took < 5 and len(message.splitlines()) == 1
    assert f"cannot download {mirror}/resnet18-f37072fd.pth (Connection refused)" in message
    assert cached(torch_home) == []


def test_two_trials_on_a_node_download_once(
    weights: tuple[dict[str, torch.Tensor], bytes],
    synthetic_root: Path,
    tmp_path: Path,
    torch_home: Path,
) -> None:
    """Two `segtune.train` processes on one machine: one downloads while the other waits on
    the lock (it says so, while the server still holds back half the file), then both load
    the same file; the server was asked once."""
    _, data = weights
    with weights_server({"/w.pth": data}) as server:
        server.hold.clear()
        pretrained = f"{server.url}/w.pth#sha256={sha256(data)}"
        procs, logs = [], []
        one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}  # two trials on a shared machine
        for i in range(2):
            logs.append(tmp_path / f"train{i}.log")
            cmd = [sys.executable, "-m", "segtune.train", "--data", str(synthetic_root)]
            cmd += ["--out", str(tmp_path / f"out{i}"), "--arch", "deeplabv3"]
            cmd += ["--backbone", BACKBONE, "--pretrained", pretrained, "--epochs", "1"]
            cmd += ["--image-size", "64", "--batch-size", "4"]
            with logs[-1].open("w") as log:
                procs.append(
                    subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=one_thread)
                )
        try:
            wait_for(
                lambda: any("waiting for another process" in p.read_text() for p in logs),
                "one trial waiting for the other's download",
                timeout=240,
                log=logs[0],
            )
            assert len(server.requests) == 1  # still held back: the waiter has not asked
            server.hold.set()
            for proc in procs:
                proc.wait(timeout=300)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    texts = [p.read_text() for p in logs]
    assert [proc.returncode for proc in procs] == [0, 0], texts
    assert server.requests == ["/w.pth"]
    assert sorted(t.count("downloading http") for t in texts) == [0, 1]
    name = f"w-{sha256(data)}.pth"
    assert cached(torch_home) == [name]
    loaded = f"pretrained {server.url}/w.pth: {torch_home / name}"
    assert all(loaded in t and "best epoch 1" in t for t in texts), texts


def test_no_weights_server_stops_the_sweep_before_any_trial(
    synthetic_root: Path,
    tmp_path: Path,
    torch_home: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import ray

    monkeypatch.setenv(WEIGHTS_MIRROR_ENV, mirror := f"http://127.0.0.1:{free_port()}")
    sweep = write_sweep(
        tmp_path / "nomirror.yaml",
        synthetic_root,
        train={"pretrained": "imagenet"},
        search_space={"arch": "deeplabv3", "backbone": BACKBONE},
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    started = time.monotonic()
    code = run_cli(run_main, [str(sweep), "--tracking-uri", uri, "--no-report"])
    took = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"error: pretrained: imagenet weights for {BACKBONE}: cannot download {mirror}/" in err
    assert "(Connection refused); check that SEGTUNE_WEIGHTS_MIRROR=" in err
    assert took < 120, took  # Ray's start, which the pre-flight runs beside
    assert not ray.is_initialized()
    assert not (tmp_path / "mlflow.db").exists()  # no run, not even a store
    assert cached(torch_home) == []


def test_every_node_fetches_the_sweeps_weights_in_its_check(
    weights: tuple[dict[str, torch.Tensor], bytes],
    synthetic_root: Path,
    tmp_path: Path,
    torch_home: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a cluster (the driver joined one) each node's pre-flight task downloads the weights;
    a node that cannot is one line naming it, the URL and the fix. The mirror reaches the
    node's worker through the sweep's runtime environment only. (Ray names this machine by its
    routable address, so the check also finds the tracking URI's loopback address.)"""
    import ray

    from segtune.sweep.node_checks import check_nodes
    from segtune.sweep.ray_init import runtime_env_vars

    _, data = weights
    ray_tmp = Path(tempfile.mkdtemp(prefix="wn-"))  # short: Ray's socket paths
    with weights_server({"/w.pth": data}) as server:
        monkeypatch.setenv(WEIGHTS_MIRROR_ENV, f"http://127.0.0.1:{free_port()}")
        env = runtime_env_vars()
        monkeypatch.delenv(WEIGHTS_MIRROR_ENV)
        ray.init(num_cpus=1, _temp_dir=str(ray_tmp), include_dashboard=False,
                 runtime_env={"env_vars": env},
                 configure_logging=False, log_to_driver=False)  # fmt: skip
        try:
            check = (DataConfig(root=str(synthetic_root)), RunStorage.of(str(tmp_path / "runs")))
            with pytest.raises(ConfigError) as info:
                check_nodes(*check, server.url, joined=True, weights=[("imagenet", "resnet18")])
            url = f"{env[WEIGHTS_MIRROR_ENV]}/resnet18-f37072fd.pth"
            # the other line: this test's tracking server is on a loopback address
            (line,) = [x for x in str(info.value).splitlines() if "pretrained" in x]
            assert re.match(
                r"  node [\d.]+ \(.+\): pretrained: imagenet weights for resnet18: ", line
            )
            assert f"cannot download {url} (Connection refused); check that " in line
            pretrained = f"{server.url}/w.pth#sha256={sha256(data)}"
            with pytest.raises(ConfigError) as info:  # the loopback line alone: weights fetched
                check_nodes(*check, server.url, joined=True, weights=[(pretrained, "")])
            assert "loopback" in str(info.value) and "pretrained" not in str(info.value)
        finally:
            ray.shutdown()
            shutil.rmtree(ray_tmp, ignore_errors=True)
    assert server.requests == ["/w.pth"]
    assert cached(torch_home) == [f"w-{sha256(data)}.pth"]


def test_a_sweep_trains_from_a_url_with_its_sha256(
    weights: tuple[dict[str, torch.Tensor], bytes],
    synthetic_root: Path,
    tmp_path: Path,
) -> None:
    """End to end: the driver's pre-flight downloads the file once, the trial loads it (with a
    learning rate too small to move them, its best.pt holds the served encoder weights)."""
    state, data = weights
    torch_home = tmp_path / "torch-home"
    with weights_server({"/w.pth": data}) as server:
        pretrained = f"{server.url}/w.pth#sha256={sha256(data)}"
        sweep = write_sweep(
            tmp_path / "fromurl.yaml",
            synthetic_root,
            train={"pretrained": pretrained, "epochs": 1, "lr": 1e-12, "weight_decay": 0.0},
            search_space={"arch": "deeplabv3", "backbone": BACKBONE, "aspp": False},
        )
        proc = run(sweep, env={"TORCH_HOME": str(torch_home)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert server.requests == ["/w.pth"]
    (trial,) = trial_runs(tmp_path, "fromurl")
    assert trial.info.status == "FINISHED" and trial.data.params["pretrained"] == pretrained
    best = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").download_artifacts(
        trial.info.run_id, "checkpoints/best.pt", str(tmp_path / "best")
    )
    model = torch.load(best, weights_only=True)["model"]
    convs = [k for k, v in state.items() if v.ndim == 4 and not k.startswith("classifier")]
    assert convs
    for key in convs:
        torch.testing.assert_close(model[f"encoder.{key}"], state[key], rtol=0, atol=1e-6)
