"""Issue 14's bad-input matrix: bad inputs and faults against segtune's commands, each judged
on whether it ends in one clear line on stderr with exit status 2.

    .venv/bin/python -m tests.bad_inputs [--out FILE] [--only TEXT] [--jobs 2]

Not a pytest module (its name does not start with `test_`): it runs the real commands in
subprocesses, one tiny sweep and one export as fixtures, and takes about ten minutes on two
cores. Everything it writes lies in a temporary folder; nothing in the checkout changes.

How a case is counted as "one clear line":

- the exit status is 2 (128 + N for a case that sends signal N, 1 for a driver fault), stderr
  holds no `Traceback`, and the command did not time out;
- stderr has exactly one line starting with `error:`, and nothing after it but log lines
  (`HH:MM:SS LEVEL name: ...`): a message that goes on over further lines is "several lines".
  Log lines, warnings and progress bars before it are allowed (they are not the error);
- argparse's own refusal (`usage: ...` then `PROG: error: ...`, exit 2) counts as clean, marked
  "yes (argparse)", and the summary gives the count without those too;
- the error line names what the case expects (the key, the file or the problem, any one of a
  few words); otherwise it is "wrong message";
- some cases add a check: refused within a time, no output folder left behind, stderr not
  echoing a 10 MB input, a user's folder byte for byte the same afterwards.

Control cases (valid inputs that must work: the fixture sweep and export, a 16-bit PNG image)
are listed apart and are not counted among the bad inputs.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "sweeps" / "quickstart.yaml"
PY = sys.executable
DROP = object()  # `put` removes the key
BIG = "@@10MB@@"  # replaced by 10 MB of text once the sweep is written

ERROR_LINE = re.compile(r"^error: ")
ARGPARSE_LINE = re.compile(r"^[\w.\- ]+: error: ")
LOG_LINE = re.compile(
    r"^(\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) "  # segtune's logging format
    r"|\[?\d{4}[-/]\d\d[-/]\d\d[ T]\d\d:\d\d:\d\d"  # Ray's and MLflow's
    r"|(\x1b\[\d+m)?\(\w+ pid=\d+)"  # a Ray worker's forwarded line
)
PROGRESS = re.compile(r"\d+%\||it/s\]|s/it\]")
GROUPS = (
    "control", "sweep schema", "sweep pre-flight", "run CLI", "signals", "dataset", "train",
    "predict", "export", "report", "bench", "data tools",
)  # fmt: skip


# --- cases and results -------------------------------------------------------------------------


@dataclass
class Case:
    group: str
    name: str
    argv: list[str]
    expect: tuple[str, ...] = ()  # any one of these, case-insensitive, in the error line
    stdin: str = ""
    timeout: float = 120.0
    max_s: float | None = None  # should be refused within this many seconds
    absent: Path | None = None  # must not exist afterwards
    check: Callable[[], str | None] | None = None  # a further check: the problem, or None
    control: bool = False  # a valid input: must succeed
    solo: bool = False  # runs alone (Ray, timing)
    env: dict[str, str] = field(default_factory=dict)
    skip: str = ""  # why it is not run here
    exit: int = 2  # the exit status a clean refusal has (128 + N after signal N)
    setup: Callable[[], None] | None = None  # makes its files just before it runs (fixtures exist)
    unchanged: Path | None = None  # every file under it byte for byte the same afterwards
    signal: int = 0  # sent once `when` is in its output (to its process group with `to_group`)
    when: str = ""
    to_group: bool = False
    wait_s: float = 0.0  # from `when` to the signal
    times: int = 1  # how often the signal is sent, a second apart


@dataclass
class Result:
    case: Case
    rc: int | None  # None: timed out
    seconds: float
    stderr: str
    lines: int = 0
    traceback: bool = False
    message: str = ""
    verdict: str = "no"  # yes | yes (argparse) | no | ok | FAILED | skipped
    reason: str = ""


def meaningful_lines(text: str) -> list[str]:
    """stderr's lines without blank ones and progress-bar redraws."""
    lines = []
    for raw in text.replace("\r\n", "\n").split("\n"):
        line = raw.split("\r")[-1].rstrip()  # a progress bar's last redraw
        if line.strip() and not PROGRESS.search(line):
            lines.append(line)
    return lines


def digests(folder: Path) -> dict[str, str]:
    """Every file under `folder` (symlinks as their targets' names) by its SHA-256."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            out[str(path)] = f"-> {os.readlink(path)}"
        elif path.is_file():
            out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def judge(case: Case, rc: int | None, seconds: float, stderr: str, changed: bool = False) -> Result:
    lines = meaningful_lines(stderr)
    result = Result(case, rc, seconds, stderr, len(lines), "Traceback" in stderr)
    errors = [i for i, line in enumerate(lines) if ERROR_LINE.match(line)]
    argparse_errors = [i for i, line in enumerate(lines) if ARGPARSE_LINE.match(line)]
    shown = errors[-1] if errors else argparse_errors[-1] if argparse_errors else len(lines) - 1
    result.message = lines[shown] if lines else ""
    problems = []
    if rc is None:
        problems.append(f"timed out after {case.timeout:g} s")
    elif result.traceback:
        problems.append("traceback")
    if case.control:
        if rc != 0:
            problems.append(f"exit {rc}")
    elif rc is not None:
        if rc == 0:
            problems.append("exit 0 (accepted)")
        elif rc != case.exit:
            problems.append(f"exit {rc}")
        argparse_style = (
            not errors and argparse_errors and any(line.startswith("usage:") for line in lines)
        )
        block = result.message
        if not errors and not argparse_style and rc != 0:
            if not result.traceback:
                problems.append("no 'error:' line")
        elif len(errors) > 1:
            problems.append(f"{len(errors)} 'error:' lines")
        elif errors:
            after = [line for line in lines[errors[0] + 1 :] if not LOG_LINE.match(line)]
            if after:
                problems.append(f"several lines (the message goes on over {len(after)} more)")
                block = " ⏎ ".join([result.message, *(line.strip() for line in after)])
                result.message = " ⏎ ".join([result.message, after[0].strip()])
        if (errors or argparse_style) and case.expect:
            low = block.lower()
            if not any(word.lower() in low for word in case.expect):
                problems.append(f"wrong message (names none of {', '.join(case.expect)})")
    if case.max_s is not None and rc is not None and seconds > case.max_s:
        problems.append(f"slow: {seconds:.0f} s, more than {case.max_s:g} s")
    if len(stderr) > 20_000:
        problems.append(f"stderr of {len(stderr)} characters (echoes the input?)")
    if case.absent is not None and case.absent.exists():
        problems.append(f"left {case.absent.name} behind")
    if changed and case.unchanged is not None:
        problems.append(f"changed the files in {case.unchanged.name}")
    if case.check is not None and rc is not None:
        with contextlib.suppress(Exception):
            extra = case.check()
            if extra:
                problems.append(extra)
    result.reason = "; ".join(problems)
    if case.control:
        result.verdict = "FAILED" if problems else "ok"
    elif problems:
        result.verdict = "no"
    else:
        result.verdict = "yes (argparse)" if not errors else "yes"
    return result


def run_case(case: Case, base_env: dict[str, str], cwd: Path) -> Result:
    if case.skip:
        return Result(case, None, 0.0, "", verdict="skipped", reason=case.skip)
    env = {**base_env, **case.env}
    if case.setup is not None:
        case.setup()
    before = digests(case.unchanged) if case.unchanged is not None else None
    started = time.monotonic()
    with tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(
            case.argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
        SESSIONS.add(proc.pid)
        try:
            if case.signal:
                send_when_seen(case, proc, (out.fileno(), err.fileno()), started)
            proc.communicate(case.stdin.encode(), timeout=case.timeout)
            rc: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: only what it started
            proc.wait()
            rc = None
        seconds = time.monotonic() - started
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    changed = (
        before is not None and case.unchanged is not None and digests(case.unchanged) != before
    )
    result = judge(case, rc, seconds, stderr, changed)
    left = session_left(proc.pid) if case.signal and rc is not None else None
    if left:  # Ray's processes must go with their driver
        result.reason = "; ".join(filter(None, [result.reason, left]))
        result.verdict = "FAILED" if case.control else "no"
    return result


def send_when_seen(
    case: Case, proc: subprocess.Popen[bytes], fds: tuple[int, ...], started: float
) -> None:
    """Send the case's signal once its text is in the command's output (read in place: the
    command shares the files' offsets), to the command alone or to its process group."""
    while not any(case.when.encode() in os.pread(fd, 1 << 24, 0) for fd in fds):
        if proc.poll() is not None or time.monotonic() - started > case.timeout:
            return  # ended (or will time out) without it: judged as it stands
        time.sleep(0.1)
    for i in range(case.times):
        time.sleep(1.0 if i else case.wait_s)
        with contextlib.suppress(ProcessLookupError):
            if case.to_group:  # as a terminal does: Ray's processes in the group get it too
                os.killpg(proc.pid, case.signal)
            else:
                os.kill(proc.pid, case.signal)


def session_left(session: int, within: float = 30.0) -> str | None:
    """Processes still in the command's session `within` seconds after it ended (Ray's)."""
    deadline = time.monotonic() + within
    while True:
        left = []
        for proc in Path("/proc").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
                if proc.name.isdigit() and int(fields[3]) == session and fields[0] != "Z":
                    left.append((proc / "comm").read_text().strip())
        if not left or time.monotonic() > deadline:
            return f"left running {within:g} s later: {', '.join(left)}" if left else None
        time.sleep(0.5)


def runs_left_running(db: Path) -> str | None:
    """The runs of a sweep's store still RUNNING (read with sqlite: no MLflow import here)."""
    import sqlite3

    if not db.is_file():
        return None
    with contextlib.closing(sqlite3.connect(db)) as con:
        (running,) = con.execute("select count(*) from runs where status = 'RUNNING'").fetchone()
    return f"{running} run(s) left RUNNING" if running else None


# --- files -----------------------------------------------------------------------------------


def put(raw: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """Set (or with DROP remove) a dotted key of a sweep mapping."""
    keys = dotted.split(".")
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    if value is DROP:
        node.pop(keys[-1], None)
    else:
        node[keys[-1]] = value
    return raw


def setting(*pairs: tuple[str, Any]) -> Callable[[dict[str, Any]], None]:
    def mutate(raw: dict[str, Any]) -> None:
        for dotted, value in pairs:
            put(raw, dotted, value)

    return mutate


@functools.lru_cache(maxsize=4)
def png_1bit(width: int, height: int) -> bytes:
    """An all-black 1-bit PNG of any size, written without holding its pixels: a bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    row = b"\x00" * (1 + (width + 7) // 8)
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def jpeg_body(data: bytes) -> tuple[int, int]:
    """Where a baseline JPEG's entropy-coded body starts and ends (before EOI)."""
    sos = data.find(b"\xff\xda")
    start = sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")
    return start, len(data) - 2


def stray_marker(data: bytes) -> bytes:
    """Header and end marker intact, a second SOF marker in the middle of the body: libjpeg
    stops with an error."""
    start, end = jpeg_body(data)
    mid = (start + end) // 2
    return data[:mid] + b"\xff\xc0\x00\x11" + data[mid:]


def random_body(data: bytes) -> bytes:
    """Header and end marker intact, the body replaced by random bytes: libjpeg decodes it
    with warnings only (Pillow shows none), into noise."""
    start, end = jpeg_body(data)
    noise = np.random.default_rng(1).integers(0, 256, end - start, dtype=np.uint8).tobytes()
    return data[:start] + noise.replace(b"\xff", b"\xfe") + data[end:]


def gray16(path: Path, gray: np.ndarray) -> None:
    """A 16-bit grayscale PNG holding `gray` (8-bit) times 257: the same picture."""
    Image.fromarray(gray.astype(np.uint16) * 257).save(path)


def mask_agreement(a: Path, b: Path, floor: float = 0.99) -> str | None:
    if not (a.is_file() and b.is_file()):
        return f"missing {a.name} or {b.name}"
    x, y = np.asarray(Image.open(a)), np.asarray(Image.open(b))
    share = float((x == y).mean()) if x.shape == y.shape else 0.0
    return None if share >= floor else f"16-bit mask agrees with the 8-bit one on {share:.1%}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def other_ray_running() -> bool:
    """A gcs_server on this machine (checked before any of ours starts): `--address auto`
    would join it."""
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit() and (proc / "comm").read_text().strip() == "gcs_server":
                return True
    return False


SESSIONS: set[int] = set()  # the pids of our commands, each the leader of its own session


def kill_leftovers(tmp: Path) -> list[int]:
    """Processes our commands left behind (Ray's): in one of their sessions, or naming our
    temporary folder on their command line (Ray's session folder lies in it)."""
    killed = []
    needle = str(tmp).encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            session = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[3])
            cmdline = (proc / "cmdline").read_bytes()
            ours = session in SESSIONS and (PY.encode() in cmdline or b"ray" in cmdline)
            if ours or needle in cmdline:
                os.kill(int(proc.name), signal.SIGKILL)
                killed.append(int(proc.name))
    return killed


# --- the matrix --------------------------------------------------------------------------------


class Matrix:
    """Builds the fixtures and the cases in a temporary folder `tmp`."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.work = tmp / "work"  # every command's working directory
        self.good = tmp / "data" / "good"
        self.runs = tmp / "runs"
        self.db = f"sqlite:///{tmp}/mlflow.db"  # the fixture sweep's store
        self.export = tmp / "export"
        self.afile = tmp / "afile"  # a regular file where a folder is wanted
        self.foreign = tmp / "foreign"  # a folder with somebody's files
        self.inputs = tmp / "inputs"
        self.torch_home = tmp / "torch-home"  # no pretrained weights in it
        self.count = 0
        for folder in (self.work, self.runs, self.foreign, self.inputs, self.torch_home):
            folder.mkdir(parents=True, exist_ok=True)
        (tmp / "db").mkdir()
        (tmp / "logs").mkdir()
        (tmp / "sweeps").mkdir()
        self.afile.write_text("a file, not a folder\n")
        (self.foreign / "notes.txt").write_text("someone's notes\n")
        self.http: subprocess.Popen[bytes] | None = None
        self.http_port = 0

    # fixtures

    def make_good_data(self, env: dict[str, str]) -> None:
        """A tiny set in the project's layout, by its own generator (random pairs without it)."""
        command = [PY, "-m", "segtune.data.synthetic", "--out", str(self.good), "--train", "6"]
        command += ["--test", "3", "--size", "64x48", "--seed", "0", "--quiet"]
        done = subprocess.run(command, env=env, cwd=self.work, capture_output=True, timeout=300)
        if done.returncode != 0 or not list(self.good.glob("train/image/*")):
            print("synthetic generator failed; writing random pairs", file=sys.stderr)
            shutil.rmtree(self.good, ignore_errors=True)
            rng = np.random.default_rng(0)
            for split, n in (("train", 6), ("test", 3)):
                for i in range(n):
                    for sub in ("image", "mask"):
                        (self.good / split / sub).mkdir(parents=True, exist_ok=True)
                    image = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
                    mask = rng.integers(0, 8, (48, 64), dtype=np.uint8)
                    Image.fromarray(image).save(self.good / split / "image" / f"p{i}.jpg")
                    Image.fromarray(mask).save(self.good / split / "mask" / f"p{i}.png")

    def first(self, root: Path, split: str = "train") -> tuple[Path, Path]:
        image = sorted((root / split / "image").iterdir())[0]
        return image, root / split / "mask" / f"{image.stem}.png"

    def make_inputs(self) -> None:
        image, _ = self.first(self.good, "test")
        shutil.copy(image, self.inputs / "ok.jpg")
        gray = np.asarray(Image.open(image).convert("L"))
        Image.fromarray(gray).save(self.inputs / "gray8.png")
        gray16(self.inputs / "gray16.png", gray)
        (self.inputs / "bomb.png").write_bytes(png_1bit(20000, 20000))
        (self.inputs / "notes.txt").write_text("not an image\n")
        (self.inputs / "text.png").write_text("a text file named .png\n")
        (self.inputs / "twin").mkdir()
        shutil.copy(image, self.inputs / "twin" / "ok.jpg")

    def faulty(self, slug: str, fault: Callable[[Path, Path, Path], None]) -> Path:
        """A copy of the good set with one fault: `fault(root, first image, its mask)`."""
        root = self.tmp / "data" / slug
        shutil.copytree(self.good, root, symlinks=True)
        image, mask = self.first(root)
        fault(root, image, mask)
        return root

    def start_http(self) -> None:
        """A web server that is not MLflow (404 everywhere), on a free loopback port."""
        self.http_port = free_port()
        (self.tmp / "www").mkdir(exist_ok=True)
        self.http = subprocess.Popen(
            [PY, "-m", "http.server", str(self.http_port), "--bind", "127.0.0.1"],
            cwd=self.tmp / "www",
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60  # listening, however slowly a busy machine starts it
        while self.http.poll() is None and time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.http_port)) == 0:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"http.server did not listen on 127.0.0.1:{self.http_port}")

    def stop_http(self) -> None:
        if self.http is not None and self.http.poll() is None:
            self.http.kill()  # by its own handle: a process this script started
            self.http.wait()

    # case builders

    def slug(self, name: str) -> str:
        self.count += 1
        return f"{self.count:03d}-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:32]

    def base_sweep(self, name: str) -> dict[str, Any]:
        """sweeps/quickstart.yaml made tiny: the good set, UNet, one epoch, a small benchmark,
        so that a bad input the checks let through costs seconds, not minutes."""
        raw = yaml.safe_load(QUICKSTART.read_text())
        raw["name"] = name
        raw["data"] = {"root": str(self.good), "cache": True}
        raw["train"].update(
            epochs=1, batch_size=2, image_size=32, unet_min_channels=8, unet_max_channels=16
        )
        raw["search_space"] = {"model": {"grid_search": [{"arch": "unet", "backbone": "none"}]}}
        raw["tune"].update(max_concurrent_trials=1, max_failures=0)
        raw["bench"] = {"input": "64x64", "threads": 1, "repeats": 1, "warmup": 0}
        return raw

    def sweep(
        self,
        group: str,
        name: str,
        mutate: Callable[[dict[str, Any]], None] | None = None,
        *,
        text: str | bytes | None = None,
        path: Path | None = None,
        extra: Sequence[str] = (),
        dry: bool = False,
        uri: str | None = None,
        **kw: Any,
    ) -> Case:
        """`python -m segtune.run SWEEP.yaml --tracking-uri ... --set tune.storage_path=...
        --no-report` on a mutated copy of the quickstart (or on `text`, or `path` as is)."""
        slug = self.slug(name)
        if path is None:
            path = self.tmp / "sweeps" / f"{slug}.yaml"
            if text is None:
                raw = self.base_sweep(f"mx-{slug}")
                if mutate is not None:
                    mutate(raw)
                text = yaml.safe_dump(raw, sort_keys=False).replace(BIG, "x" * 10_000_000)
            if isinstance(text, bytes):
                path.write_bytes(text)
            else:
                path.write_text(text)
        argv = [PY, "-m", "segtune.run", str(path)]
        argv += ["--tracking-uri", uri or f"sqlite:///{self.tmp}/db/{slug}.db"]
        argv += ["--set", f"tune.storage_path={self.runs}", "--no-report", *extra]
        if dry:
            argv.append("--dry-run")
        return Case(group, name + (" (--dry-run)" if dry else ""), argv, **kw)

    def data_case(
        self, name: str, fault: Callable[[Path, Path, Path], None], expect: tuple[str, ...]
    ) -> Case:
        root = self.faulty(re.sub(r"[^a-z0-9]+", "-", name.lower())[:40], fault)
        return self.sweep(
            "dataset", name, setting(("data.root", str(root))), expect=expect, timeout=180
        )

    def command(self, group: str, name: str, module: str, *args: Any, **kw: Any) -> Case:
        return Case(group, name, [PY, "-m", module, *map(str, args)], **kw)

    def train(self, name: str, *args: Any, data: Path | None = None, **kw: Any) -> Case:
        out = self.tmp / "train" / self.slug(name)
        base = ["--data", data or self.good, "--out", out, "--epochs", "1", "--batch-size", "2"]
        base += ["--image-size", "32", "--set", "unet_min_channels=8"]
        base += ["--set", "unet_max_channels=16", "--device", "cpu"]
        return self.command("train", name, "segtune.train", *base, *args, **kw)

    def predict(self, name: str, *args: Any, export: Path | None = None, **kw: Any) -> Case:
        return self.command("predict", name, "segtune.predict", export or self.export, *args, **kw)

    def out(self, name: str) -> Path:
        return self.tmp / "pred" / self.slug(name)


# --- the cases ---------------------------------------------------------------------------------


def sweep_cases(m: Matrix, has_gpu: bool) -> list[Case]:
    g = "sweep schema"
    s = m.sweep
    gm = "search_space.model.grid_search"
    cases = [
        s(g, "unknown top-level key (trian)", setting(("trian", {"epochs": 2})), expect=("trian",)),
        s(
            g,
            "unknown tune key (schedular)",
            setting(("tune.schedular", "asha")),
            expect=("schedular",),
        ),
        s(g, "unknown trial key (train.epoch)", setting(("train.epoch", 3)), expect=("epoch",)),
        s(
            g,
            "unknown key in a search-space mapping",
            setting((gm, [{"arch": "unet", "backbone": "none", "depth": 3}])),
            expect=("depth",),
        ),
        s(g, "train.epochs: ten", setting(("train.epochs", "ten")), expect=("epochs",)),
        s(g, "train.epochs: 0", setting(("train.epochs", 0)), expect=("epochs",)),
        s(g, "train.epochs: -3", setting(("train.epochs", -3)), expect=("epochs",)),
        s(g, "train.epochs: 2.5", setting(("train.epochs", 2.5)), expect=("epochs",)),
        s(g, "train.batch_size: 0", setting(("train.batch_size", 0)), expect=("batch_size",)),
        s(g, "train.lr: -0.001", setting(("train.lr", -0.001)), expect=("lr",)),
        s(g, "train.lr: fast (a string)", setting(("train.lr", "fast")), expect=("lr",)),
        s(g, "train.image_size: 16", setting(("train.image_size", 16)), expect=("image_size",)),
        s(
            g,
            "arch: resnet (no such arch)",
            setting((gm, [{"arch": "resnet", "backbone": "none"}])),
            expect=("arch",),
        ),
        s(
            g,
            "backbone: resnet999",
            setting((gm, [{"arch": "deeplabv3plus", "backbone": "resnet999"}])),
            expect=("resnet999",),
        ),
        s(
            g,
            "backbone: resnet999",
            setting((gm, [{"arch": "deeplabv3plus", "backbone": "resnet999"}])),
            dry=True,
            expect=("resnet999",),
        ),
        s(
            g,
            "deeplabv3 with backbone: none",
            setting((gm, [{"arch": "deeplabv3", "backbone": "none"}])),
            expect=("needs a backbone",),
        ),
        s(  # aspp is DeepLab's head switch, True by default: every UNet trial carries it, and
            # its label drops it (unet-none); so an explicit one is accepted, not refused
            g,
            "aspp: true on unet: accepted",
            setting((gm, [{"arch": "unet", "backbone": "none", "aspp": True}])),
            dry=True,
            control=True,
        ),
        s(g, "bench.input: 96by64", setting(("bench.input", "96by64")), expect=("bench.input",)),
        s(
            g,
            "bench.input: 96by64",
            setting(("bench.input", "96by64")),
            dry=True,
            expect=("bench.input",),
        ),
        s(g, "bench.input: 0x0", setting(("bench.input", "0x0")), expect=("bench.input",)),
        s(g, "bench.input: -1x5", setting(("bench.input", "-1x5")), expect=("bench.input",)),
        s(
            g,
            "data.synthetic.size: 0x0",
            setting(
                ("data.root", str(m.tmp / "data" / "nosyn")),
                ("data.synthetic", {"train": 4, "test": 2, "size": "0x0"}),
            ),
            expect=("data.synthetic.size",),
        ),
        s(
            g,
            "data.synthetic.size: big",
            setting(
                ("data.root", str(m.tmp / "data" / "nosyn")),
                ("data.synthetic", {"train": 4, "test": 2, "size": "big"}),
            ),
            expect=("data.synthetic.size",),
        ),
        s(g, "name: ..", setting(("name", "..")), expect=("name",)),
        s(g, "name: .", setting(("name", ".")), expect=("name",)),
        s(g, "name: a/b (a slash)", setting(("name", "a/b")), expect=("name",)),
        s(g, "name: 'my sweep' (a space)", setting(("name", "my sweep")), expect=("name",)),
        s(g, "description of 10 MB", setting(("description", BIG)), expect=("description",)),
        s(g, "no name", setting(("name", DROP)), expect=("name",)),
        s(
            g,
            "no data section (default root absent)",
            setting(("data", DROP)),
            expect=("tiny-floodnet",),
        ),
        s(g, "empty file", text="", expect=("empty", "name")),
        s(g, "a YAML list, not a mapping", text="- name: x\n- train: {}\n", expect=("mapping",)),
        s(g, "a YAML scalar", text="hello\n", expect=("mapping",)),
        s(g, "invalid YAML (unclosed bracket)", text="name: x\ntrain: [1, 2\n", expect=("yaml",)),
        s(
            g,
            "not text (binary, not UTF-8)",
            text=bytes(range(128, 256)) * 8,
            expect=("utf", "text", "yaml", "binary"),
        ),
        s(
            g,
            "file does not exist",
            path=m.tmp / "sweeps" / "nope.yaml",
            expect=("not found", "no such"),
        ),
        s(
            g,
            "a directory instead of a file",
            path=m.tmp / "sweeps",
            expect=("director", "not a file", "a folder, not a sweep file"),
        ),
        s(
            g,
            "the sweep file is /dev/null",
            path=Path("/dev/null"),
            expect=("a character device, not a sweep file",),
        ),
        s(g, "train: a list, not a mapping", setting(("train", [1, 2])), expect=("train",)),
        s(g, "grid_search of nothing", setting((gm, [])), expect=("non-empty",)),
        s(
            g,
            "uniform with low > high",
            setting(("tune.search", "random"), ("search_space.lr", {"uniform": [0.1, 0.01]})),
            expect=("low < high",),
        ),
        s(
            g,
            "loguniform from 0",
            setting(("tune.search", "random"), ("search_space.lr", {"loguniform": [0, 0.1]})),
            expect=("0 < low",),
        ),
        s(
            g,
            "unknown form (normal)",
            setting(("tune.search", "random"), ("search_space.lr", {"normal": [0, 1]})),
            expect=("search_space.lr",),
        ),
        s(
            g,
            "uniform under search: grid",
            setting(("search_space.lr", {"uniform": [0.001, 0.01]})),
            expect=("tune.search",),
        ),
        s(
            g,
            "grid_search under search: optuna",
            setting(("tune.search", "optuna")),
            expect=("optuna",),
        ),
        s(
            g,
            "tune.scheduler: hyperband",
            setting(("tune.scheduler", "hyperband")),
            expect=("tune.scheduler",),
        ),
        s(g, "tune.search: bayes", setting(("tune.search", "bayes")), expect=("tune.search",)),
        s(
            g,
            "tune.max_concurrent_trials: 0",
            setting(("tune.max_concurrent_trials", 0)),
            expect=("max_concurrent_trials",),
        ),
        s(
            g,
            "resources_per_trial.cpu: 0",
            setting(("tune.resources_per_trial", {"cpu": 0})),
            expect=("cpu",),
        ),
        s(g, "tune.num_samples: 0", setting(("tune.num_samples", 0)), expect=("num_samples",)),
        s(g, "tune.repeats: 0", setting(("tune.repeats", 0)), expect=("repeats",)),
        s(
            g,
            "two metrics under search: grid",
            setting(("tune.metric", ["val_miou", "infer_ms_cpu"]), ("tune.mode", ["max", "min"])),
            expect=("tune.metric",),
        ),
        s(g, "tune.mode: maximize", setting(("tune.mode", "maximize")), expect=("tune.mode",)),
        s(
            g,
            "asha with grace_period >= epochs",
            setting(("tune.scheduler", "asha"), ("tune.grace_period", 3)),
            expect=("grace_period",),
        ),
        s(g, "mlflow.outage_s: 1", setting(("mlflow.outage_s", 1)), expect=("outage_s",)),
        s(
            g,
            "data.eval_resize: crop",
            setting(("data.eval_resize", "crop")),
            expect=("eval_resize",),
        ),
    ]
    cases += space_cases(m)
    g = "sweep pre-flight"
    cases += [
        s(
            g,
            "resources_per_trial.gpu: 1 without a GPU",
            setting(("tune.resources_per_trial", {"cpu": 1, "gpu": 1})),
            expect=("gpu",),
            skip="this machine has a GPU" if has_gpu else "",
        ),
        s(
            g,
            "data.root does not exist",
            setting(("data.root", str(m.tmp / "data" / "nowhere"))),
            expect=("does not exist",),
        ),
        s(
            g,
            "data.root is a file",
            setting(("data.root", str(m.afile))),
            expect=("not a folder", "not a directory", "is a file"),
        ),
        s(
            g,
            "data.val_split: 1.5",
            setting(("data.val_split", 1.5)),
            expect=("val_split", "fraction"),
        ),
        s(
            g,
            "data.val_split: val, no val split",
            setting(("data.val_split", "val")),
            expect=("val",),
        ),
        s(
            g,
            "data.synthetic at a root holding another set",
            setting(("data.synthetic", {"train": 4, "test": 2, "size": "64x48"})),
            expect=("synthetic",),
        ),
        s(
            g,
            "pretrained: a missing file",
            setting(("train.pretrained", str(m.tmp / "none.pt"))),
            expect=("pretrained",),
        ),
        s(
            g,
            "pretrained: imagenet, weights absent",
            setting(
                ("train.pretrained", "imagenet"),
                (gm, [{"arch": "deeplabv3plus", "backbone": "resnet18"}]),
            ),
            expect=("resnet18",),
        ),
        s(
            g,
            "pretrained: imagenet on the classic UNet",
            setting(("train.pretrained", "imagenet")),
            expect=("needs a backbone",),
        ),
        s(
            g,
            "unet_min_channels > unet_max_channels",
            setting(("train.unet_min_channels", 64)),
            expect=("unet_min_channels",),
        ),
        s(
            g,
            "storage_endpoint with a local storage_path",
            setting(("tune.storage_endpoint", "http://127.0.0.1:9")),
            expect=("storage_endpoint",),
        ),
        s(
            g,
            "tune.storage_path under a file",
            extra=["--set", f"tune.storage_path={m.afile}/runs"],
            expect=("storage_path",),
        ),
    ]
    return cases


def space_cases(m: Matrix) -> list[Case]:
    """Issue 23 (7, 8): each search-space value against its trial key, the metric names and the
    sweep's size, refused by the sweep file's check before Ray starts (most as --dry-run, which
    runs the same check; the first two without)."""
    g, s, inf = "sweep schema", m.sweep, float("inf")

    def space(key: str, spec: Any, search: str = "random") -> Callable[[dict[str, Any]], None]:
        return setting(("tune.search", search), (f"search_space.{key}", spec))

    def lists(form: str, search: str, **sizes: int) -> Callable[[dict[str, Any]], None]:
        """`form` lists of 1..n over the keys given, under tune.search `search`."""
        pairs = ((f"search_space.{k}", {form: list(range(1, n + 1))}) for k, n in sizes.items())
        return setting(("tune.search", search), *pairs)

    dry = {"dry": True, "max_s": 60}
    return [
        s(
            g,
            "before Ray: lr loguniform [1e-4, .inf]",
            space("lr", {"loguniform": [1e-4, inf]}),
            expect=("finite",),
        ),
        s(
            g,
            "before Ray: batch_size grid_search [8, 0]",
            space("batch_size", {"grid_search": [8, 0]}, "grid"),
            expect=("batch_size.grid_search[1]",),
        ),
        s(
            g,
            "before Ray: lr uniform [.nan, 0.1]",
            space("lr", {"uniform": [float("nan"), 0.1]}),
            expect=("finite",),
            **dry,
        ),
        s(
            g,
            "before Ray: lr loguniform from -0.001",
            space("lr", {"loguniform": [-1e-3, 1e-2]}),
            expect=("0 < low",),
            **dry,
        ),
        s(
            g,
            "before Ray: weight_decay loguniform from 0",
            space("weight_decay", {"loguniform": [0, 1e-3]}),
            expect=("0 < low",),
            **dry,
        ),
        s(
            g,
            "before Ray: batch_size randint [16, 2] (reversed)",
            space("batch_size", {"randint": [16, 2]}),
            expect=("low < high",),
            **dry,
        ),
        s(
            g,
            "before Ray: randint on a float key (lr)",
            space("lr", {"randint": [1, 5]}),
            expect=("uniform or loguniform",),
            **dry,
        ),
        s(
            g,
            "before Ray: uniform on an int key (batch_size)",
            space("batch_size", {"uniform": [2, 16]}),
            expect=("randint",),
            **dry,
        ),
        s(
            g,
            "before Ray: uniform over arch",
            space("arch", {"uniform": [0, 1]}),
            expect=("arch takes one of",),
            **dry,
        ),
        s(
            g,
            "before Ray: randint over output_stride (8, 16, 32)",
            space("output_stride", {"randint": [8, 32]}),
            expect=("output_stride",),
            **dry,
        ),
        s(
            g,
            "before Ray: choice of nothing",
            space("lr", {"choice": []}),
            expect=("non-empty",),
            **dry,
        ),
        s(
            g,
            "before Ray: quniform (no such form)",
            space("lr", {"quniform": [1e-4, 1e-2, 1e-5]}),
            expect=("quniform",),
            **dry,
        ),
        s(
            g,
            "before Ray: uniform with one bound",
            space("lr", {"uniform": [1e-4]}),
            expect=("[low, high]",),
            **dry,
        ),
        s(
            g,
            "before Ray: randint [1, 4.5] on epochs",
            space("epochs", {"randint": [1, 4.5]}),
            expect=("two integers",),
            **dry,
        ),
        s(
            g,
            "before Ray: seed randint [0, 10^30]",
            space("seed", {"randint": [0, 10**30]}),
            expect=("64-bit",),
            **dry,
        ),
        s(
            g,
            "before Ray: two forms in one entry",
            space("lr", {"loguniform": [1e-4, 1e-2], "choice": [1e-3]}),
            expect=("search_space.lr",),
            **dry,
        ),
        s(
            g,
            "before Ray: a typo for a trial key (lrr)",
            space("lrr", {"loguniform": [1e-4, 1e-2]}),
            expect=("did you mean lr",),
            **dry,
        ),
        s(
            g,
            "before Ray: lr .inf in a group's mapping",
            setting(
                (
                    "search_space.model.grid_search",
                    [{"arch": "unet", "backbone": "none", "lr": inf}],
                )
            ),
            expect=("finite",),
            **dry,
        ),
        s(
            g,
            "before Ray: train.lr .nan",
            setting(("train.lr", float("nan"))),
            expect=("finite",),
            **dry,
        ),
        s(
            g,
            "before Ray: tune.metric val_mIoU (not reported)",
            setting(("tune.metric", "val_mIoU")),
            expect=("did you mean val_miou",),
            **dry,
        ),
        s(
            g,
            "before Ray: tune.metric [] (none)",
            setting(("tune.metric", []), ("tune.mode", [])),
            expect=("tune.metric",),
            **dry,
        ),
        s(
            g,
            "before Ray: asha on an unreported metric",
            setting(("tune.scheduler", "asha"), ("tune.metric", "miou"), ("train.epochs", 3)),
            expect=("not a metric trials report",),
            **dry,
        ),
        s(
            g,
            "before Ray: train.select_metric miou",
            setting(("train.select_metric", "miou")),
            expect=("select_metric",),
            **dry,
        ),
        s(
            g,
            "before Ray: tune.repeats 1000000000",
            setting(("tune.repeats", 10**9)),
            expect=("1,000,000,000 trials",),
            dry=True,
            max_s=10,
        ),
        s(
            g,
            "before Ray: tune.num_samples 10^12",
            setting(("tune.search", "random"), ("tune.num_samples", 10**12)),
            expect=("1,000,000,000,000 trials",),
            dry=True,
            max_s=10,
        ),
        s(
            g,
            "before Ray: grids of 20 x 20 x 20 x 10 values",
            lists("grid_search", "grid", epochs=20, batch_size=20, seed=20, num_workers=10),
            expect=("80,000 trials",),
            dry=True,
            max_s=10,
        ),
        s(
            g,
            "before Ray: choices of 10^6 combinations",
            lists(
                "choice",
                "random",
                epochs=10,
                batch_size=10,
                seed=10,
                num_workers=10,
                eval_multiple=10,
                warmup_epochs=10,
            ),
            expect=("combinations",),
            dry=True,
            max_s=10,
        ),
        s(
            g,
            "before Ray: a valid sampled space: accepted",
            setting(
                ("tune.search", "random"),
                ("search_space.lr", {"loguniform": [1e-4, 1e-2]}),
                ("search_space.batch_size", {"randint": [2, 4]}),
                ("search_space.dropout", {"uniform": [0.0, 0.5]}),
            ),
            dry=True,
            control=True,
        ),
    ]


def cli_cases(m: Matrix) -> list[Case]:
    g = "run CLI"
    s = m.sweep
    return [
        s(
            g,
            "--set 'train.lr=[1,' (unfinished YAML)",
            extra=["--set", "train.lr=[1,"],
            expect=("--set",),
        ),
        s(g, "--set train.lr (no =)", extra=["--set", "train.lr"], expect=("--set",)),
        s(g, "--set =5 (no key)", extra=["--set", "=5"], expect=("--set",)),
        s(
            g,
            "--set train.nokey=1 (unknown key)",
            extra=["--set", "train.nokey=1"],
            expect=("nokey",),
        ),
        s(
            g,
            "--set name.x=1 (not a section)",
            extra=["--set", "name.x=1"],
            expect=("not a section",),
        ),
        s(g, "--resume with no earlier sweep", extra=["--resume"], expect=("--resume",)),
        s(g, "an unknown option", extra=["--frobnicate"], expect=("frobnicate",)),
        m.command(g, "no sweep file argument", "segtune.run", expect=("sweep",)),
        s(g, "--tracking-uri foo://bar", uri="foo://bar", expect=("foo",)),
        s(g, "--tracking-uri http://[::1", uri="http://[::1", expect=("tracking uri",)),
    ]


def resume_cases(m: Matrix) -> list[Case]:
    """`--resume` of a started sweep (its storage as its first driver left it: the state file
    and the saved copy, written by segtune's own functions) after an edit: refused before Ray,
    no MLflow store made, the saved copy untouched."""
    from segtune.config.sweep import load_sweep
    from segtune.sweep.edits import SWEEP_COPY_FILE, SWEEP_STATE_FILE, sweep_text
    from segtune.sweep.preflight import absolute_paths
    from segtune.sweep.storage import RunStorage

    g = "run CLI"

    def edited(
        name: str, edit: Callable[[dict[str, Any]], None] | None, *extra: str,
        copy: str | None = None, start: Callable[[dict[str, Any]], None] | None = None,
        **kw: Any,
    ) -> Case:  # fmt: skip
        """The sweep as `start` leaves the quickstart, started (`copy`: the saved copy's text
        instead), then resumed after `edit` with `extra` options."""
        slug = m.slug(name)
        raw = m.base_sweep(f"mx-{slug}")
        if start is not None:
            start(raw)
        first = m.tmp / "sweeps" / f"{slug}-started.yaml"
        first.write_text(yaml.safe_dump(raw, sort_keys=False))
        sweep, _ = absolute_paths(load_sweep(first, [f"tune.storage_path={m.runs}"]), "")
        storage = RunStorage.of(sweep.tune.storage_path)
        storage.write_text(json.dumps({"parent_run_id": "0" * 32}), sweep.name, SWEEP_STATE_FILE)
        saved = m.runs / sweep.name / SWEEP_COPY_FILE
        if copy != "":  # "": a sweep an older segtune started, with no copy
            storage.write_text(sweep_text(sweep) if copy is None else copy, sweep.name,
                               SWEEP_COPY_FILE)  # fmt: skip
        before = saved.read_text() if saved.exists() else None
        if edit is not None:
            edit(raw)
        db = m.tmp / "db" / f"{slug}.db"

        def untouched() -> str | None:
            return None if (saved.read_text() if saved.exists() else None) == before else (
                "the saved copy changed"
            )  # fmt: skip

        return m.sweep(
            g, name, text=yaml.safe_dump(raw, sort_keys=False), uri=f"sqlite:///{db}",
            extra=["--resume", *extra], absent=db, check=untouched, **kw,
        )  # fmt: skip

    unet = {"arch": "unet", "backbone": "none"}
    deeplab = {"arch": "deeplabv3", "backbone": "mobilenet_v3_small"}
    return [
        m.sweep(
            g,
            "--accept-changes without --resume",
            extra=["--accept-changes"],
            expect=("--accept-changes",),
        ),
        edited(
            "--resume after adding a grid point",
            setting(("search_space.model", {"grid_search": [unet, deeplab]})),
            expect=("search_space.model",),
        ),
        edited(
            "--resume after editing train.epochs",
            setting(("train.epochs", 2)),
            expect=("train.epochs",),
        ),
        edited(
            "--resume with another --set train.batch_size",
            None,
            "--set",
            "train.batch_size=4",
            expect=("train.batch_size",),
        ),
        edited(
            "--resume --accept-changes after editing data.val_split",
            setting(("data.val_split", 0.25)),
            "--accept-changes",
            expect=("data.val_split",),
        ),
        edited(
            "--resume --accept-changes after editing tune.search",
            setting(("tune.search", "random")),
            "--accept-changes",
            expect=("tune.search",),
        ),
        edited(
            "--resume after editing bench.threads",
            setting(("bench.threads", 2)),
            expect=("bench.threads",),
        ),
        edited(
            "--resume after editing mlflow.experiment",
            setting(("mlflow.experiment", "other")),
            expect=("mlflow.experiment",),
        ),
        edited(
            "--resume --accept-changes that drops the grid point",
            setting(("search_space.model", {"grid_search": [deeplab]})),
            "--accept-changes",
            expect=("drops",),
        ),
        edited(
            "--resume --accept-changes of fewer samples",
            setting(("tune.num_samples", 1)),
            "--accept-changes",
            start=setting(("tune.num_samples", 2)),
            expect=("drops",),
        ),
        edited(
            "--resume with a saved copy that is not YAML",
            None,
            copy="name: [unclosed\n",
            expect=("damaged",),
        ),
        edited(
            "--resume with a saved copy that is a list",
            None,
            copy="- a list\n",
            expect=("damaged",),
        ),
        edited(
            "--resume --accept-changes of a sweep with no saved copy",
            None,
            "--accept-changes",
            copy="",
            expect=("no copy",),
        ),
    ]


def solo_cases(m: Matrix) -> list[Case]:
    """Cases that start Ray or time a refusal: run alone, one after another."""
    g = "run CLI"
    s = m.sweep
    no_aws = {
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "x",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    return [
        s(
            g,
            "--tracking-uri http://127.0.0.1:9 (nothing listens)",
            uri="http://127.0.0.1:9",
            expect=("127.0.0.1:9",),
            max_s=12,
            solo=True,
        ),
        s(
            g,
            "--tracking-uri sqlite under a file",
            uri=f"sqlite:///{m.afile}/mlflow.db",
            expect=("tracking", "sqlite", "afile"),
            solo=True,
            timeout=180,
        ),
        s(
            g,
            "--tracking-uri of a web server that is not MLflow",
            uri="http://127.0.0.1:{port}",
            expect=("tracking", "mlflow"),
            solo=True,
            timeout=180,
        ),
        s(
            g,
            "--tracking-uri postgresql://127.0.0.1:9/db",
            uri="postgresql://u@127.0.0.1:9/db",
            expect=("tracking", "postgresql"),
            solo=True,
            timeout=180,
        ),
        # not 127.0.0.1: Ray would replace it by the machine's interface address, and a test
        # sends nothing beyond loopback; the driver's probe refuses 127.0.0.2:9 before Ray starts
        s(
            g,
            "--address 127.0.0.2:9 (no Ray head there)",
            extra=["--address", "127.0.0.2:9"],
            expect=("--address 127.0.0.2:9",),
            max_s=20,
        ),
        s(g, "--address of no port", extra=["--address", "headnode"], expect=("HOST:PORT",)),
        s(
            g,
            "resources_per_trial.cpu: 64 on 2 cores",
            setting(("tune.resources_per_trial", {"cpu": 64})),
            expect=("cpu",),
            solo=True,
            timeout=180,
        ),
        s(
            g,
            "S3 storage at an endpoint nobody serves",
            extra=[
                "--set",
                "tune.storage_path=s3://bucket/sweeps",
                "--set",
                "tune.storage_endpoint=http://127.0.0.1:9",
            ],
            expect=("storage",),
            solo=True,
            timeout=180,
            env=no_aws,
        ),
        m.command(
            "export",
            "--tracking-uri http://127.0.0.1:9",
            "segtune.export",
            "--experiment",
            "mx-good",
            "--tracking-uri",
            "http://127.0.0.1:9",
            "--out",
            m.tmp / "exp-x",
            expect=("127.0.0.1:9",),
            max_s=15,
            timeout=45,
            solo=True,
        ),
    ]


def signal_cases(m: Matrix) -> list[Case]:
    """A terminal closed or a driver signalled at each moment of a sweep (issue 23): exit 128 +
    the signal, one line naming it, no run left RUNNING, the line kept beside the sweep's state
    (with the --resume command once trials ran), and nothing of the driver's session left."""
    g = "signals"
    hup, quit_ = signal.SIGHUP, signal.SIGQUIT
    trials = "Started monitoring system metrics"  # a trial's first line: it trains from here
    # MLflow's INFO lines, that one among them, otherwise come with -v only (cli.setup_logging)
    mlflow_info = {"MLFLOW_LOGGING_LEVEL": "INFO"}
    costs = setting(("search_space", {"unet_min_channels": {"grid_search": [4, 6, 8]}}),
                    ("bench.input", "512x384"), ("bench.repeats", 5))  # fmt: skip
    cases = []
    for name, mutate, signum, when, group, times, resumable in (
        ("SIGHUP while Ray starts", None, hup, "starting Ray", False, 1, False),
        ("SIGHUP to the group while Ray starts", None, hup, "starting Ray", True, 1, False),
        ("SIGHUP while the costs are timed", costs, hup, "cost 1/3", False, 1, False),
        ("SIGHUP to the group while the costs are timed", costs, hup, "cost 1/3", True, 1, False),
        ("SIGHUP during the trials", None, hup, trials, False, 1, True),
        ("SIGHUP to the group during the trials (terminal closed)", None, hup, trials, True, 1,
         True),
        ("SIGHUP twice during the trials (stop at once)", None, hup, trials, False, 2, False),
        ("SIGQUIT to the group during the trials (Ctrl-\\)", None, quit_, trials, True, 1, True),
    ):  # fmt: skip
        sweep = f"mx-sig-{len(cases)}"
        db = m.tmp / "db" / f"{sweep}.db"
        change = mutate or setting()
        cases.append(
            m.sweep(
                g,
                name,
                lambda raw, change=change, sweep=sweep: (
                    change(raw),
                    setting(("name", sweep), ("train.epochs", 200))(raw),
                ),
                uri=f"sqlite:///{db}",
                expect=(signal.Signals(signum).name,),
                exit=128 + signum,
                signal=signum,
                when=when,
                to_group=group,
                times=times,
                wait_s=1.0 if when == "starting Ray" else 3.0 if when == trials else 0.0,
                env=mlflow_info if when == trials else {},
                check=functools.partial(
                    stopped_cleanly, db, m.runs / sweep, resumable, when != trials
                ),
                solo=True,
                timeout=300,
            )
        )
    nohup = m.sweep(
        "control",
        "SIGHUP to the group of a driver under nohup: the sweep goes on",
        setting(("name", "mx-nohup"), ("train.epochs", 20)),
        uri=f"sqlite:///{m.tmp}/db/mx-nohup.db",
        control=True,
        signal=hup,
        when=trials,
        env=mlflow_info,
        to_group=True,
        check=functools.partial(runs_left_running, m.tmp / "db" / "mx-nohup.db"),
        solo=True,
        timeout=300,
    )
    nohup.argv = ["nohup", *nohup.argv]
    under_file = m.tmp / "db" / "mx-art-under-file.db"
    cases += [
        nohup,
        m.sweep(
            g,
            "experiment's artifact location under a file",
            setting(("name", "mx-art")),
            uri=f"sqlite:///{under_file}",
            expect=("1 run(s) closed as KILLED",),
            exit=1,
            setup=functools.partial(experiment_at, under_file, "mx-art", m.afile / "artifacts"),
            check=functools.partial(runs_left_running, under_file),
            solo=True,
            timeout=300,
        ),
    ]
    return cases


def stopped_cleanly(db: Path, folder: Path, resumable: bool, early: bool) -> str | None:
    """No run left RUNNING (none at all if stopped `early`, before its trials), and the stop's
    line kept in the sweep's folder of the run storage, with the --resume command where
    `resumable`."""
    import sqlite3

    from segtune.config.names import COST_EXPERIMENT

    kept = folder / "segtune_stopped.txt"
    text = kept.read_text() if kept.is_file() else ""
    problems = [runs_left_running(db)]
    if early and db.is_file():  # the cost table's runs record timings made before the signal
        with contextlib.closing(sqlite3.connect(db)) as con:
            (runs,) = con.execute(
                "select count(*) from runs join experiments using (experiment_id) "
                "where experiments.name != ?",
                (COST_EXPERIMENT,),
            ).fetchone()
        problems.append(f"went on: {runs} run(s) made after the signal" if runs else None)
    if not text:
        problems.append(f"no line kept in {kept}")
    elif resumable and "continue it with" not in text:
        problems.append(f"no --resume command in {kept}")
    return "; ".join(filter(None, problems)) or None


def experiment_at(db: Path, name: str, location: Path) -> None:
    """Experiment `name` in the store `db`, its artifacts at `location`, made before the case."""
    code = "import sys; from mlflow.tracking import MlflowClient as C; "
    code += "C(sys.argv[1]).create_experiment(sys.argv[2], artifact_location=sys.argv[3])"
    subprocess.run([PY, "-c", code, f"sqlite:///{db}", name, str(location)], check=True,
                   capture_output=True, timeout=120)  # fmt: skip


def dataset_cases(m: Matrix) -> list[Case]:
    def drop(path: Path) -> None:
        path.unlink()

    def resize_mask(root: Path, image: Path, mask: Path) -> None:
        Image.open(mask).resize((32, 24), Image.NEAREST).save(mask)

    def mask_value(value: int, mode16: bool = False) -> Callable[[Path, Path, Path], None]:
        def fault(root: Path, image: Path, mask: Path) -> None:
            values = np.asarray(Image.open(mask)).astype(np.uint16 if mode16 else np.uint8)
            values = values.copy()
            values[0, 0] = value
            Image.fromarray(values).save(mask)

        return fault

    def rewrite(change: Callable[[bytes], bytes]) -> Callable[[Path, Path, Path], None]:
        return lambda root, image, mask: image.write_bytes(change(image.read_bytes()))

    def as_png(data: bytes) -> Callable[[Path, Path, Path], None]:
        def fault(root: Path, image: Path, mask: Path) -> None:
            image.unlink()
            image.with_suffix(".png").write_bytes(data)

        return fault

    def self_loop(root: Path, image: Path, mask: Path) -> None:
        image.unlink()
        os.symlink(image.name, image)

    def dangling(root: Path, image: Path, mask: Path) -> None:
        image.unlink()
        os.symlink(m.tmp / "nowhere.jpg", image)

    def empty_split(split: str) -> Callable[[Path, Path, Path], None]:
        def fault(root: Path, image: Path, mask: Path) -> None:
            for sub in ("image", "mask"):
                for path in (root / split / sub).iterdir():
                    path.unlink()

        return fault

    def rgb_mask(root: Path, image: Path, mask: Path) -> None:
        Image.open(mask).convert("RGB").save(mask)

    d = m.data_case
    return [
        d("image without mask", lambda r, i, k: drop(k), ("has no mask",)),
        d("mask without image", lambda r, i, k: drop(i), ("has no image",)),
        d("mask size differs from its image", resize_mask, ("must match",)),
        d("mask value 9 (out of range)", mask_value(9), ("mask values",)),
        d("16-bit mask with value 300", mask_value(300, mode16=True), ("0..255",)),
        d("RGB mask", rgb_mask, ("rgb_masks",)),
        d("truncated JPEG", rewrite(lambda b: b[: len(b) // 2]), ("truncated",)),
        d("empty (0-byte) image", rewrite(lambda b: b""), ("empty file",)),
        d(
            "JPEG body corrupt (a stray marker)",
            rewrite(stray_marker),
            ("unreadable", "corrupt", "broken"),
        ),
        d("JPEG body of random bytes", rewrite(random_body), ("unreadable", "corrupt", "broken")),
        d("a text file named .jpg", rewrite(lambda b: b"hello, I am text\n" * 20), ("not a jpeg",)),
        d("self-looping symlink", self_loop, ("symlink", "loop")),
        d("dangling symlink", dangling, ("symlink",)),
        d(
            "20000x20000 PNG (decompression bomb)",
            as_png(png_1bit(20000, 20000)),
            ("pixels", "bomb"),
        ),
        d(
            "12000x10000 PNG (over 100 MP, under Pillow's bomb limit)",
            as_png(png_1bit(12000, 10000)),
            ("megapixels", "pixels"),
        ),
        d("empty train split", empty_split("train"), ("empty",)),
        d("empty validation split (test)", empty_split("test"), ("empty",)),
        d("no validation split", lambda r, i, k: shutil.rmtree(r / "test"), ("missing",)),
    ]


def train_cases(m: Matrix, has_gpu: bool) -> list[Case]:
    t = m.train
    corrupt = m.faulty("train-corrupt", lambda r, i, k: i.write_bytes(stray_marker(i.read_bytes())))
    bomb = m.faulty(
        "train-bomb",
        lambda r, i, k: (i.unlink(), i.with_suffix(".png").write_bytes(png_1bit(20000, 20000))),
    )
    run = m.tmp / "train" / "no-last"
    run.mkdir(parents=True)
    return [
        t("--epochs 0", "--epochs", "0", expect=("epochs",)),
        t("--epochs abc", "--epochs", "abc", expect=("epochs",)),
        t(
            "--arch deeplabv3 --backbone nope",
            "--arch",
            "deeplabv3",
            "--backbone",
            "nope",
            expect=("nope",),
        ),
        t("--set nokey=1", "--set", "nokey=1", expect=("nokey",)),
        t("--lr -1", "--lr", "-1", expect=("lr",)),
        t("--val-split 2", "--val-split", "2", expect=("val-split", "fraction")),
        t(
            "--data that does not exist",
            data=m.tmp / "data" / "nowhere",
            expect=("does not exist",),
        ),
        t("--resume without last.pt", "--out", run, "--resume", expect=("last.pt",)),
        t("--out is a file", "--out", m.afile, expect=("--out", "afile")),
        t("--pretrained a missing file", "--pretrained", m.tmp / "none.pt", expect=("pretrained",)),
        t(
            "--device cuda without a GPU",
            "--device",
            "cuda",
            expect=("cuda",),
            skip="this machine has a GPU" if has_gpu else "",
        ),
        t("--device tpu", "--device", "tpu", expect=("--device", "tpu")),
        t("dataset with a corrupt JPEG body", data=corrupt, expect=("unreadable", "corrupt")),
        t("dataset with a PNG bomb", data=bomb, expect=("pixels", "bomb")),
    ]


def predict_cases(m: Matrix, has_gpu: bool) -> list[Case]:
    p = m.predict
    i = m.inputs
    empty = m.tmp / "empty-export"
    empty.mkdir()
    tampered = m.tmp / "tampered-export"
    bomb_out, text_out = m.out("bomb"), m.out("text")

    return [
        p(
            "export folder does not exist",
            i / "ok.jpg",
            "--out",
            m.out("a"),
            export=m.tmp / "no-export",
            expect=("no-export",),
        ),
        p(
            "an empty folder as export",
            i / "ok.jpg",
            "--out",
            m.out("b"),
            export=empty,
            expect=("not an export folder", "SHA256SUMS"),
        ),
        p(
            "a 20000x20000 PNG bomb",
            i / "bomb.png",
            "--out",
            bomb_out,
            expect=("no readable image", "pixels"),
            absent=bomb_out,
        ),
        p(
            "a non-image file (.txt)",
            i / "notes.txt",
            "--out",
            m.out("c"),
            expect=("not an image",),
        ),
        p(
            "a text file named .png",
            i / "text.png",
            "--out",
            text_out,
            expect=("no readable image", "unreadable"),
            absent=text_out,
        ),
        p(
            "an input that does not exist",
            i / "nope.jpg",
            "--out",
            m.out("d"),
            expect=("nope.jpg",),
        ),
        p("--tile 33", i / "ok.jpg", "--out", m.out("e"), "--tile", "33", expect=("--tile",)),
        p("--alpha 2", i / "ok.jpg", "--out", m.out("f"), "--alpha", "2", expect=("--alpha",)),
        p(
            "--device cuda without a GPU",
            i / "ok.jpg",
            "--out",
            m.out("g"),
            "--device",
            "cuda",
            expect=("cuda",),
            skip="this machine has a GPU" if has_gpu else "",
        ),
        p(
            "--onnx, exported without ONNX",
            i / "ok.jpg",
            "--out",
            m.out("h"),
            "--onnx",
            expect=("onnx",),
        ),
        p(
            "a tampered model.pt (checksums)",
            i / "ok.jpg",
            "--out",
            m.out("i"),
            export=tampered,
            expect=("sha256", "checksum"),
        ),
        p("--out is a file", i / "ok.jpg", "--out", m.afile, expect=("--out", "afile")),
        p(
            "two inputs with the same stem",
            i / "ok.jpg",
            i / "twin" / "ok.jpg",
            "--out",
            m.out("j"),
            expect=("ok.png", "both"),
        ),
        *output_cases(m),
    ]


def output_cases(m: Matrix) -> list[Case]:
    """Issue 23: predict never writes over an input or one path twice, and a device or a pipe
    is named for what it is; each refused before any work, the inputs untouched."""
    p = m.predict

    def photos(name: str) -> Path:
        """A case's own folder of PNG inputs: their masks would have their names."""
        folder = m.tmp / name
        folder.mkdir()
        for photo in ("photo.png", "field.png"):
            shutil.copy(m.inputs / "gray8.png", folder / photo)
        return folder

    own, linked, dotted, hardlinked = (photos(f"own-{n}") for n in ("a", "b", "c", "d"))
    (m.tmp / "own-link").symlink_to(linked)
    hard = m.tmp / "hard-out"
    hard.mkdir()
    shutil.copy(m.inputs / "ok.jpg", m.tmp / "other.jpg")
    os.link(hardlinked / "photo.png", hard / "other.png")  # other.jpg's mask is the photo
    pair = m.tmp / "overlay-pair"
    pair.mkdir()
    for name in ("a.jpg", "a_overlay.jpg"):
        shutil.copy(m.inputs / "ok.jpg", pair / name)
    cases = m.tmp / "case-pair"
    cases.mkdir()
    for name in ("A.jpg", "a.jpg"):
        shutil.copy(m.inputs / "ok.jpg", cases / name)
    (m.tmp / "zero.jpg").symlink_to("/dev/zero")
    os.mkfifo(m.tmp / "pipe.png")
    (m.tmp / "broken-out").symlink_to(m.tmp / "nowhere")
    taken = m.tmp / "taken-out"
    (taken / "ok.png").mkdir(parents=True)
    pair_out, case_out = m.out("overlay pair"), m.out("case pair")
    return [
        p("--out is the input folder", own, "--out", own, expect=("input folder",), unchanged=own),
        p(
            "--out a symlink to the input folder",
            linked,
            "--out",
            m.tmp / "own-link",
            expect=("input folder",),
            unchanged=linked,
        ),
        p(
            "--out the folder of an input file named with ..",
            dotted / "photo.png",
            "--out",
            dotted / ".." / dotted.name,
            expect=("is the input",),
            unchanged=dotted,
        ),
        p(
            "an output that is a hard link of an input",
            hardlinked / "photo.png",
            m.tmp / "other.jpg",
            "--out",
            hard,
            expect=("is the input",),
            unchanged=hardlinked,
        ),
        p(
            "a.jpg and a_overlay.jpg with --overlay",
            pair,
            "--out",
            pair_out,
            "--overlay",
            expect=("a_overlay.png",),
            absent=pair_out,
        ),
        p(
            "two names that differ only in case",
            cases,
            "--out",
            case_out,
            expect=("A.png and a.png",),
            absent=case_out,
        ),
        p(
            "an input named twice",
            m.inputs / "ok.jpg",
            m.inputs / "ok.jpg",
            "--out",
            m.out("twice"),
            expect=("named twice",),
        ),
        p("an input that is /dev/null", "/dev/null", "--out", m.out("k"), expect=("device",)),
        p(
            "an image that is a symlink to /dev/zero",
            m.tmp / "zero.jpg",
            "--out",
            m.out("l"),
            expect=("symlink to /dev/zero",),
        ),
        p("a FIFO as input", m.tmp / "pipe.png", "--out", m.out("m"), expect=("FIFO",), max_s=60),
        p("--out /dev/null", m.inputs / "ok.jpg", "--out", "/dev/null", expect=("device",)),
        p(
            "--out a broken symlink",
            m.inputs / "ok.jpg",
            "--out",
            m.tmp / "broken-out",
            expect=("leads nowhere",),
        ),
        p(
            "--out an input image file",
            m.inputs / "ok.jpg",
            "--out",
            m.inputs / "ok.jpg",
            expect=("is a file",),
            unchanged=m.inputs,
        ),
        p(
            "a mask's name taken by a folder in --out",
            m.inputs / "ok.jpg",
            "--out",
            taken,
            expect=("is a folder",),
        ),
    ]


def _on_store(m: Matrix, group: str, module: str) -> Callable[..., Case]:
    """Cases of a command that reads MLflow: the fixture's store unless a case names its own."""

    def case(name: str, *args: Any, **kw: Any) -> Case:
        base = ["--tracking-uri", m.db] if "--tracking-uri" not in args else []
        return m.command(group, name, module, *base, *args, **kw)

    return case


def export_cases(m: Matrix) -> list[Case]:
    e = _on_store(m, "export", "segtune.export")

    out = m.tmp / "exp"
    return [
        e("unknown experiment", "--experiment", "nope", "--out", out / "a", expect=("nope",)),
        e(
            "--constraints malformed",
            "--experiment",
            "mx-good",
            "--constraints",
            "size_mb<<3",
            "--out",
            out / "b",
            expect=("--constraints",),
        ),
        e(
            "--budget on a metric nobody has",
            "--experiment",
            "mx-good",
            "--budget",
            "nosuch<3",
            "--out",
            out / "c",
            expect=("nosuch",),
        ),
        e(
            "--budget (former name of --constraints) that no trial meets",
            "--experiment",
            "mx-good",
            "--budget",
            "size_mb<0",
            "--out",
            out / "d",
            expect=("within the constraints",),
        ),
        e(
            "--format foo",
            "--experiment",
            "mx-good",
            "--format",
            "foo",
            "--out",
            out / "e",
            expect=("--format",),
        ),
        e("neither --experiment nor --run-id", "--out", out / "f", expect=("--experiment",)),
        e("--run-id unknown", "--run-id", "deadbeef", "--out", out / "g", expect=("deadbeef",)),
        e(
            "--metric unknown",
            "--experiment",
            "mx-good",
            "--metric",
            "nosuch",
            "--out",
            out / "h",
            expect=("nosuch",),
        ),
        e(
            "--out a folder with other files",
            "--experiment",
            "mx-good",
            "--out",
            m.foreign,
            expect=("--out",),
        ),
        e(
            "--tracking-uri foo://bar",
            "--experiment",
            "mx-good",
            "--tracking-uri",
            "foo://bar",
            "--out",
            out / "i",
            expect=("foo",),
        ),
        *export_out_cases(m, e),
    ]


def export_out_cases(m: Matrix, e: Callable[..., Case]) -> list[Case]:
    """Issue 23: an export never deletes or overwrites a file it did not write; each case's
    folder byte for byte the same afterwards."""
    downloads = m.tmp / "downloads"  # a user's folder with a SHA256SUMS of its own
    downloads.mkdir()
    (downloads / "debian.iso").write_bytes(os.urandom(100_000))
    (downloads / "thesis.tex").write_text("\\documentclass{article}\n")
    (downloads / "SHA256SUMS").write_text(
        hashlib.sha256((downloads / "debian.iso").read_bytes()).hexdigest() + "  debian.iso\n"
    )
    plus, edited = m.tmp / "export-plus-notes", m.tmp / "export-edited"

    def copy_export(folder: Path, change: Callable[[Path], None]) -> Callable[[], None]:
        def setup() -> None:
            shutil.copytree(m.export, folder)
            change(folder)

        return setup

    def add_notes(folder: Path) -> None:
        (folder / "notes.txt").write_text("mine\n")

    def edit_readme(folder: Path) -> None:
        with (folder / "README.md").open("a") as f:
            f.write("my notes\n")

    locked = m.tmp / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    best = ("--experiment", "mx-good", "--format", "torchscript", "--out")
    return [
        e(
            "--out a folder with a user's own SHA256SUMS",
            *best,
            downloads,
            expect=("--force",),
            unchanged=downloads,
        ),
        e(
            "--out a folder with a user's own SHA256SUMS, --force",
            *best,
            downloads,
            "--force",
            expect=("SHA256SUMS",),
            unchanged=downloads,
        ),
        e(
            "--out an old export plus a user's file",
            *best,
            plus,
            expect=("notes.txt",),
            setup=copy_export(plus, add_notes),
            unchanged=plus,
        ),
        e(
            "--out an export whose README.md a user edited, --force",
            *best,
            edited,
            "--force",
            expect=("README.md",),
            setup=copy_export(edited, edit_readme),
            unchanged=edited,
        ),
        e(
            "--out a folder it cannot write",
            *best,
            locked,
            expect=("not writable",),
            unchanged=locked,
            skip="root writes into any folder" if os.geteuid() == 0 else "",
        ),
        e("--out in /proc/sys (not writable)", *best, "/proc/sys/segtune", expect=("writable",)),
        e("--out /dev/null", *best, "/dev/null", expect=("device",)),
        e("--out under a file", *best, m.afile / "x", expect=("afile",)),
        e("--out a broken symlink", *best, m.tmp / "broken-out", expect=("leads nowhere",)),
    ]


def report_cases(m: Matrix) -> list[Case]:
    r = _on_store(m, "report", "dashboards.report")

    out = m.tmp / "rep"
    return [
        r("unknown experiment", "--experiment", "nope", "--out", out / "a", expect=("nope",)),
        r(
            "--constraints malformed",
            "--experiment",
            "mx-good",
            "--constraints",
            "size_mb<<3",
            "--out",
            out / "b",
            expect=("--constraints",),
        ),
        r(
            "--run-id - with empty stdin",
            "--experiment",
            "mx-good",
            "--run-id",
            "-",
            "--out",
            out / "c",
            expect=("--run-id",),
        ),
        r(
            "--ema 1.5",
            "--experiment",
            "mx-good",
            "--ema",
            "1.5",
            "--out",
            out / "d",
            expect=("--ema",),
        ),
        r(
            "--ema nan",
            "--experiment",
            "mx-good",
            "--ema",
            "nan",
            "--out",
            out / "e",
            expect=("--ema",),
        ),
        r(
            "--run-id unknown",
            "--experiment",
            "mx-good",
            "--run-id",
            "deadbeef",
            "--out",
            out / "f",
            expect=("deadbeef",),
        ),
        r(
            "--out under a file",
            "--experiment",
            "mx-good",
            "--no-log",
            "--out",
            m.afile / "rep",
            expect=("--out", "afile"),
        ),
        r(
            "--tracking-uri foo://bar",
            "--experiment",
            "mx-good",
            "--tracking-uri",
            "foo://bar",
            expect=("foo",),
        ),
    ]


def tool_cases(m: Matrix) -> list[Case]:
    def b(name: str, *args: Any, **kw: Any) -> Case:
        return m.command("bench", name, "segtune.bench", "models", *args, **kw)

    quick = ["--arch", "unet", "--backbone", "none", "--input", "64x64", "--repeats", "1"]
    quick += ["--warmup", "0", "--no-gpu"]
    c = m.command
    return [
        b("--input 96by64", "--input", "96by64", expect=("96by64",)),
        b("--input 0x0", "--input", "0x0", expect=("0x0",)),
        b("--input=-1x5", "--input=-1x5", expect=("-1x5",)),
        b("--threads 0", "--threads", "0", expect=("--threads",)),
        b("--repeats 0", "--repeats", "0", expect=("--repeats",)),
        b("--warmup -1", "--warmup", "-1", expect=("--warmup",)),
        b("--arch nope", "--arch", "nope", expect=("nope",)),
        b("--amp nope", "--amp", "nope", expect=("--amp",)),
        b("--csv under a file", *quick, "--csv", m.afile / "x.csv", expect=("--csv",)),
        c(
            "data tools",
            "synthetic --size 0x0",
            "segtune.data.synthetic",
            "--out",
            m.tmp / "syn-a",
            "--size",
            "0x0",
            "--quiet",
            expect=("0x0",),
        ),
        c(
            "data tools",
            "synthetic --train -1",
            "segtune.data.synthetic",
            "--out",
            m.tmp / "syn-b",
            "--train",
            "-1",
            "--test",
            "1",
            "--size",
            "64x48",
            "--quiet",
            expect=("count",),
        ),
        c(
            "data tools",
            "synthetic --out under a file",
            "segtune.data.synthetic",
            "--out",
            m.afile / "syn",
            "--train",
            "1",
            "--test",
            "1",
            "--size",
            "64x48",
            "--quiet",
            expect=("afile", "--out"),
        ),
        c(
            "data tools",
            "baseline of a missing root",
            "segtune.training.baseline",
            m.tmp / "nowhere",
            expect=("does not exist",),
        ),
        c(
            "data tools",
            "baseline --split nosuch",
            "segtune.training.baseline",
            m.good,
            "--split",
            "nosuch",
            expect=("nosuch",),
        ),
        c(
            "data tools",
            "stats --plot under a file",
            "segtune.data.stats",
            m.good,
            "--quiet",
            "--plot",
            m.afile / "x.png",
            expect=("--plot", "afile"),
        ),
        c(
            "data tools",
            "convert_floodnet of a missing source",
            "segtune.data.convert_floodnet",
            m.tmp / "nowhere",
            m.tmp / "cf",
            "--quiet",
            expect=("nowhere",),
        ),
        c(
            "data tools",
            "cluster check of a missing file",
            "segtune.cluster",
            "check",
            m.tmp / "nope.yaml",
            expect=("nope.yaml",),
        ),
    ]


# --- running and printing ----------------------------------------------------------------------


def short(text: str, tmp: Path, limit: int = 160) -> str:
    text = text.replace(str(tmp), "TMP").replace(PY, "python").replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def table(results: Iterable[Result], tmp: Path, control: bool = False) -> list[str]:
    head = "| group | case | exit | lines | traceback | s | "
    head += (
        "works? | why not |" if control else "one clear line? | message (error line, shortened) |"
    )
    rows = [head, "|" + "---|" * 8]
    for r in results:
        rc = (
            "timeout"
            if r.rc is None and r.verdict != "skipped"
            else ("-" if r.rc is None else r.rc)
        )
        last = r.reason if control else short(r.message, tmp)
        rows.append(
            f"| {r.case.group} | {short(r.case.name, tmp, 70)} | {rc} | {r.lines} | "
            f"{'yes' if r.traceback else 'no'} | {r.seconds:.0f} | {r.verdict} | {last} |"
        )
    return rows


def report(results: list[Result], tmp: Path, wall: float, killed: list[int]) -> str:
    controls = [r for r in results if r.case.control]
    bad = [r for r in results if not r.case.control and r.verdict != "skipped"]
    skipped = [r for r in results if r.verdict == "skipped"]
    clean = [r for r in bad if r.verdict.startswith("yes")]
    by_argparse = [r for r in clean if r.verdict == "yes (argparse)"]
    out = ["# Bad-input matrix (issue 14)", ""]
    out.append(
        "A case is one clear line when it exits 2, prints no traceback, and stderr has one line "
        "starting with `error:` with nothing after it but log lines, and that line names what the "
        "case expects (key, file or problem). Log lines, warnings and progress bars before it are "
        "allowed. argparse's `usage:` + `PROG: error:` (exit 2) counts as clean, marked."
    )
    out += ["", "## Controls (valid inputs, must work; not counted)", ""]
    out += table(controls, tmp, control=True)
    out += ["", "## Bad inputs", ""]
    out += table(bad, tmp)
    out += [
        "",
        f"**{len(bad)} bad inputs tried, {len(clean)} ended in one clear line with exit 2** "
        f"({len(by_argparse)} of them argparse's usage + error form; {len(clean) - len(by_argparse)} "
        f"with segtune's own `error:` line). Wall time {wall / 60:.1f} min.",
    ]
    if skipped:
        out.append("Skipped: " + "; ".join(f"{r.case.name} ({r.reason})" for r in skipped))
    if killed:
        out.append(f"Left-over processes killed after the run: {len(killed)}")
    out += ["", "## Not one clear line", ""]
    for r in bad:
        if not r.verdict.startswith("yes"):
            out.append(f"- {r.case.group} / {short(r.case.name, tmp, 90)}: {r.reason}")
    for r in controls:
        if r.verdict != "ok":
            out.append(f"- control {r.case.name}: {r.reason}")
    return "\n".join(out) + "\n"


def run_all(
    cases: Sequence[Case], env: dict[str, str], cwd: Path, jobs: int, total: int, done: list[int]
) -> list[Result]:
    def one(case: Case) -> Result:
        result = run_case(case, env, cwd)
        slug = re.sub(r"[^a-z0-9]+", "-", f"{case.group} {case.name}".lower()).strip("-")
        (cwd.parent / "logs" / f"{slug[:80]}.txt").write_text(
            " ".join(case.argv) + f"\nexit {result.rc}\n" + result.stderr
        )
        done[0] += 1
        print(
            f"[{done[0]}/{total}] {case.group}: {case.name} -> "
            f"{'timeout' if result.rc is None else result.rc} {result.seconds:.0f}s {result.verdict}",
            file=sys.stderr,
            flush=True,
        )
        return result

    if jobs <= 1:
        return [one(c) for c in cases]
    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(one, cases))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bad_inputs", description=__doc__)
    parser.add_argument("--out", type=Path, help="also write the Markdown report here")
    parser.add_argument("--only", help="run only cases whose group or name holds this text")
    parser.add_argument("--jobs", type=int, default=2, help="fast cases at once (default 2)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)
    has_gpu = any(Path("/dev").glob("nvidia[0-9]*"))
    started = time.monotonic()
    holder = None if args.keep else tempfile.TemporaryDirectory(prefix="bad-inputs-")
    if holder is None:
        Path("/tmp/matrix").mkdir(exist_ok=True)
    tmp = Path(holder.name if holder else tempfile.mkdtemp(prefix="kept-", dir="/tmp/matrix"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    env.update(
        NO_ALBUMENTATIONS_UPDATE="1",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_TMPDIR=str(tmp / "ray"),  # our Ray sessions apart from anyone else's
        TORCH_HOME=str(tmp / "torch-home"),
        SEGTUNE_WEIGHTS_MIRROR="http://127.0.0.1:9",  # nothing answers: offline, at once
        PYTHONPATH=str(REPO),
    )
    (tmp / "ray").mkdir()
    m = Matrix(tmp)
    killed: list[int] = []
    try:
        m.make_good_data(env)
        m.make_inputs()
        m.start_http()
        fixture = m.sweep(
            "control",
            "tiny sweep (fixture)",
            setting(("name", "mx-good")),
            uri=m.db,
            control=True,
            timeout=400,
        )
        export = m.command(
            "control",
            "export of its best trial (fixture)",
            "segtune.export",
            "--experiment",
            "mx-good",
            "--tracking-uri",
            m.db,
            "--out",
            m.export,
            "--format",
            "torchscript",
            control=True,
            timeout=300,
        )
        auto = m.sweep(
            "run CLI",
            "--address auto with no Ray running",
            extra=["--address", "auto"],
            expect=("address", "ray"),
            solo=True,
            timeout=180,
        )
        auto.env = {"RAY_TMPDIR": str(tmp / "ray-auto")}
        if other_ray_running():
            auto.skip = "another Ray cluster runs on this machine: auto would join it"
        sixteen = m.faulty(
            "sixteen",
            lambda r, i, k: (
                gray16(i.with_suffix(".png"), np.asarray(Image.open(i).convert("L"))),
                i.unlink(),
            ),
        )
        controls_late = [
            m.train("16-bit PNG image in the dataset: accepted", data=sixteen, control=True),
            m.predict(
                "16-bit PNG image: same mask as its 8-bit copy",
                m.inputs / "gray8.png",
                m.inputs / "gray16.png",
                "--out",
                m.tmp / "pred16",
                control=True,
                check=lambda: mask_agreement(
                    m.tmp / "pred16" / "gray8.png", m.tmp / "pred16" / "gray16.png"
                ),
            ),
        ]
        fast = [
            *sweep_cases(m, has_gpu),
            *cli_cases(m),
            *resume_cases(m),
            *dataset_cases(m),
            *train_cases(m, has_gpu),
            *predict_cases(m, has_gpu),
            *export_cases(m),
            *report_cases(m),
            *tool_cases(m),
            *controls_late,
        ]
        solo = [*solo_cases(m), *signal_cases(m)]
        for case in solo:  # the web server's port is known only now
            case.argv = [a.replace("{port}", str(m.http_port)) for a in case.argv]
        first = [auto, fixture, export]
        if args.only:
            keep = args.only.lower()
            pick = [c for c in [auto, *fast, *solo] if keep in f"{c.group} {c.name}".lower()]
            needs_fixture = any(c.group in ("predict", "export", "report") for c in pick)
            first = [auto] if auto in pick else []
            first += [fixture, export] if needs_fixture else []
            fast = [c for c in fast if c in pick]
            solo = [c for c in solo if c in pick]
        total = len(first) + len(fast) + len(solo)
        done = [0]
        results = run_all(first, env, m.work, 1, total, done)
        if m.export.is_dir():  # the tampered copy of the fixture export
            shutil.copytree(m.export, tmp / "tampered-export")
            model = tmp / "tampered-export" / "model.pt"
            if model.is_file():
                with model.open("ab") as f:
                    f.write(b"\0")
        results += run_all(fast, env, m.work, args.jobs, total, done)
        results += run_all(solo, env, m.work, 1, total, done)
    finally:
        m.stop_http()
        killed = kill_leftovers(tmp)
        if holder is None:
            print(f"kept {tmp} (each case's stderr in logs/)", file=sys.stderr)
        else:
            holder.cleanup()
    order = {id(c): i for i, c in enumerate([*first, *fast, *solo])}
    results.sort(key=lambda r: (GROUPS.index(r.case.group), order[id(r.case)]))
    text = report(results, tmp, time.monotonic() - started, killed)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
