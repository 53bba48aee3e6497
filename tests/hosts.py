"""Machines built inside this one, for `ray up`: Linux namespaces, nothing outside them.

Each host is a network namespace on a private subnet that exists only inside the test (a bridge
in the launcher's namespace joins them; no namespace has a route anywhere else), with its own
mount and PID namespaces (`ray stop` on one host must not see another's processes) and its own
`sshd` that accepts the test's key:

- its home (`~`) is its own folder (root's home is rewritten in a private /etc/passwd);
- `/tmp` and `/run` are its own tmpfs, so Ray's session folders are per host, as on machines;
- the checkout's path shows the host's own `~/segtune`, so no host sees the launcher's project
  folder; only the already-built venv is bind-mounted, read-only, at `~/segtune/.venv` (the
  setup's `make install` finds its stamp and installs nothing: no 6 GB install per host);
- `/mnt/shared` is a folder every host mounts (run storage, like NFS);
- PostgreSQL's system folders are overlays whose writes land in the host's folder;
- the test's own folder is hidden by a tmpfs.

The launcher runs in the bridge's namespace with its own /tmp and HOME. Every process of a host
lives in its namespace, so `pids()` finds what `ray down` left, and `close()` kills by PID.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers import wait_for

SUBNET = "10.213.7"  # inside the test's namespaces only
CHECKOUT = Path(__file__).resolve().parents[1]
# system folders a host's setup may change (Debian's PostgreSQL): an overlay per host
SYSTEM_STATE = [Path(p) for p in ("/etc/postgresql", "/var/lib/postgresql", "/var/log/postgresql")]
VENV = Path(sys.prefix)


def hosts_missing() -> str | None:
    """Why this machine cannot build the hosts, or None."""
    if os.geteuid() != 0:
        return "network and mount namespaces need root"
    for tool in ("ip", "unshare", "rsync", "ssh", "ssh-keygen"):
        if not shutil.which(tool):
            return f"{tool} is not installed (Debian: iproute2, util-linux, rsync, openssh-client)"
    if not Path("/usr/sbin/sshd").exists():
        return "sshd is not installed (Debian: openssh-server)"
    deps = hashlib.sha256(
        (CHECKOUT / "pyproject.toml").read_bytes() + (CHECKOUT / "constraints.txt").read_bytes()
    )
    if not (VENV / f".installed-{deps.hexdigest()[:16]}").exists():
        return (
            f"{VENV} is not installed from this pyproject.toml and constraints.txt (`make install`)"
        )
    return None


def _sh(*command: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in command], check=check, capture_output=True, text=True)


@dataclass
class Host:
    name: str
    ip: str
    netns: str
    folder: Path
    sshd: subprocess.Popen[bytes] | None = None

    @property
    def home(self) -> Path:
        """The host's `~`, seen from outside."""
        return self.folder / "home"


@dataclass
class Hosts:
    root: Path
    lan: str
    hosts: dict[str, Host] = field(default_factory=dict)

    @classmethod
    def create(cls) -> Hosts:
        # outside /tmp: the launcher gets its own /tmp and must still see this folder
        root = Path(tempfile.mkdtemp(prefix="st-", dir="/var/tmp"))
        tag = uuid.uuid4().hex[:6]
        self = cls(root=root, lan=f"st{tag}-lan")
        _sh("ip", "netns", "add", self.lan)
        _sh("ip", "-n", self.lan, "link", "set", "lo", "up")
        _sh("ip", "-n", self.lan, "link", "add", "br0", "type", "bridge")
        _sh("ip", "-n", self.lan, "addr", "add", f"{SUBNET}.1/24", "dev", "br0")
        _sh("ip", "-n", self.lan, "link", "set", "br0", "up")
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", root / "key")
        for sub in ("shared", "launcher/home", "launcher/tmp"):
            (root / sub).mkdir(parents=True)
        return self

    @property
    def key(self) -> Path:
        return self.root / "key"

    def add(self, name: str, number: int) -> Host:
        host = Host(
            name, f"{SUBNET}.{number}", self.lan.replace("-lan", f"-{name}"), self.root / name
        )
        _sh("ip", "netns", "add", host.netns)
        _sh("ip", "-n", host.netns, "link", "set", "lo", "up")
        peer = f"{name}-port"
        _sh("ip", "-n", host.netns, "link", "add", "eth0", "type", "veth",
            "peer", "name", peer, "netns", self.lan)  # fmt: skip
        _sh("ip", "-n", self.lan, "link", "set", peer, "master", "br0", "up")
        _sh("ip", "-n", host.netns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
        _sh("ip", "-n", host.netns, "link", "set", "eth0", "up")
        sshd = host.folder / "sshd"
        sshd.mkdir(parents=True)
        host.home.mkdir()
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", sshd / "host_key")
        shutil.copy(self.key.with_suffix(".pub"), sshd / "authorized_keys")
        (sshd / "sshd_config").write_text(
            f"ListenAddress {host.ip}:22\nHostKey /mnt/sshd/host_key\nPidFile none\n"
            "AuthorizedKeysFile /mnt/sshd/authorized_keys\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
            "StrictModes no\nPrintMotd no\nMaxSessions 100\nMaxStartups 100\n"
            "Subsystem sftp internal-sftp\n"
        )
        passwd = Path("/etc/passwd").read_text().splitlines()
        (sshd / "passwd").write_text(
            "\n".join(
                line.replace(":/root:", ":/mnt/home:") if line.startswith("root:") else line
                for line in passwd
            )
            + "\n"
        )
        overlays = ""
        for system in SYSTEM_STATE:  # writes go to the host's folder, never to this machine's
            if system.is_dir():
                upper, work = host.folder / f"state{system}", host.folder / f"work{system}"
                upper.mkdir(parents=True)
                work.mkdir(parents=True)
                info = system.stat()
                os.chown(upper, info.st_uid, info.st_gid)
                upper.chmod(info.st_mode & 0o7777)
                overlays += (
                    f"mount -t overlay overlay -o lowerdir={system},upperdir={upper},"
                    f"workdir={work} {system}\n"
                )
        script = f"""set -e
hostname {name}
{overlays}
mount -t tmpfs -o mode=755 tmpfs /mnt
mkdir /mnt/home /mnt/shared /mnt/sshd
mount --bind {host.home} /mnt/home
mount --bind {self.root}/shared /mnt/shared
mount --bind {sshd} /mnt/sshd
mkdir -p /mnt/home/segtune/.venv
mount --bind {VENV} /mnt/home/segtune/.venv
mount -o remount,bind,ro /mnt/home/segtune/.venv
mount --rbind /mnt/home/segtune {CHECKOUT}
mount --bind /mnt/sshd/passwd /etc/passwd
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mkdir -p /run/sshd
mount -t tmpfs tmpfs {self.root}
exec /usr/sbin/sshd -D -e -f /mnt/sshd/sshd_config
"""
        log = (host.folder / "sshd.log").open("wb")
        host.sshd = subprocess.Popen(
            ["ip", "netns", "exec", host.netns, "unshare", "--mount", "--propagation", "private",
             "--pid", "--fork", "--mount-proc", "--uts", "sh", "-c", script],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self.hosts[name] = host
        wait_for(lambda: self._answers_ssh(host), f"sshd on {name}", timeout=30,
                 process=host.sshd, log=host.folder / "sshd.log")  # fmt: skip
        return host

    def _answers_ssh(self, host: Host) -> bool:
        probe = f"import socket; s=socket.socket(); s.settimeout(1); exit(s.connect_ex(({host.ip!r}, 22)))"
        return (
            _sh(
                "ip", "netns", "exec", self.lan, sys.executable, "-c", probe, check=False
            ).returncode
            == 0
        )

    def launcher(self, command: list[str], env: dict[str, str]) -> list[str]:
        """`command` as run on the launching machine: its own /tmp (Ray's cluster state, SSH
        control sockets), HOME and network (it reaches only the hosts)."""
        script = f'mount --bind {self.root}/launcher/tmp /tmp && exec "$@"'
        env.update(HOME=str(self.root / "launcher" / "home"), TMPDIR="/tmp")
        return ["ip", "netns", "exec", self.lan, "unshare", "--mount", "--propagation", "private",
                "sh", "-c", script, "sh", *command]  # fmt: skip

    def ssh(
        self, host: Host, command: str, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """`command` in a login shell on `host` (as Ray runs its commands)."""
        return subprocess.run(
            ["ip", "netns", "exec", self.lan, "ssh", "-i", str(self.key), "-o", "BatchMode=yes",
             "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
             "-o", "LogLevel=ERROR", f"root@{host.ip}", f"bash --login -i -c {shlex.quote(command)}"],
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip

    def pids(self, host: Host) -> dict[int, str]:
        """Every process in the host's namespace: pid -> command line."""
        found = {}
        for pid in _sh("ip", "netns", "pids", host.netns, check=False).stdout.split():
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                found[int(pid)] = cmdline.decode(errors="replace").strip()
        return found

    def close(self) -> None:
        """Kill every process of every namespace by PID, delete the namespaces and the folder."""
        for netns in [*(h.netns for h in self.hosts.values()), self.lan]:
            for _ in range(50):
                pids = _sh("ip", "netns", "pids", netns, check=False).stdout.split()
                if not pids:
                    break
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
                time.sleep(0.1)
            _sh("ip", "netns", "del", netns, check=False)
        for host in self.hosts.values():
            if host.sshd is not None:
                host.sshd.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)

    def leftovers(self) -> list[str]:
        """Namespaces, their mounts under /run/netns, and folders of this test still present."""
        names = [self.lan, *(h.netns for h in self.hosts.values())]
        listed = _sh("ip", "netns", "list", check=False).stdout
        mounts = Path("/proc/mounts").read_text()
        return [
            *(f"namespace {n}" for n in names if n in listed),
            *(f"mount {n}" for n in names if f"/run/netns/{n}" in mounts),
            *([f"folder {self.root}"] if self.root.exists() else []),
        ]
