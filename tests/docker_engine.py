"""A private Docker engine for tests/test_compose_stack.py (and ops/compose-check.sh, which runs that test).

No image registry is reachable from this machine, so the two images the compose file starts from are built
from Debian packages (``debootstrap``) and tagged with the official names (``python:3.11-slim``,
``redis:7``) inside this engine only: the real Dockerfile and compose file build unchanged. What a user
pulls are the official images.

The engine runs with ``--iptables=false --bridge=none``: it leaves the host's firewall (the FORWARD policy
other tests rely on) and ``docker0`` alone. Containers on one compose network still reach each other, and
published ports go through docker-proxy on loopback, which is all the test talks to.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

#: Debian packages of the base root file system: Python for the inferpool image, redis-server for Redis.
BASE_PACKAGES = ["python3", "python3-pip", "python3-venv", "ca-certificates", "redis-server"]
#: The host's CA bundle, baked into the base image so pip inside a build trusts what the host trusts.
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def missing_tools() -> list[str]:
    """What this machine lacks to run the engine (empty: it can)."""
    missing = [tool for tool in ("dockerd", "docker", "docker-compose", "debootstrap") if shutil.which(tool) is None]
    if os.geteuid() != 0:
        missing.append("root")
    return missing


def run(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 600, check: bool = True,
        input_text: str | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, input=input_text)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args[:4])}... failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")  # fmt: skip
    return proc


class DockerEngine:
    """``dockerd`` with its own data, exec root and socket under a short temporary directory."""

    def __init__(self) -> None:
        # Short: containerd's unix sockets live under the exec root and a socket path has ~100 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="ipd-", dir="/tmp"))
        self.socket = self.root / "docker.sock"
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.socket}", "COMPOSE_INTERACTIVE_NO_CLI": "1"}
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DockerEngine:
        log = (self.root / "dockerd.log").open("wb")
        self._proc = subprocess.Popen(
            ["dockerd", "--data-root", str(self.root / "data"), "--exec-root", str(self.root / "exec"),
             "-H", f"unix://{self.socket}", "--pidfile", str(self.root / "docker.pid"), "--iptables=false",
             "--ip6tables=false", "--bridge=none", "--storage-driver=overlay2"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while run(["docker", "info"], env=self.env, check=False, timeout=30).returncode != 0:
            assert self._proc.poll() is None, self.log()
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.5)
        return self

    def log(self) -> str:
        return (self.root / "dockerd.log").read_text(errors="replace")[-4000:]

    def docker(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(["docker", *args], env=self.env, timeout=timeout, check=check)

    def build_base_images(self, cache_dir: Path) -> None:
        """``python:3.11-slim`` and ``redis:7`` from one Debian root file system (kept in ``cache_dir`` between
        runs: debootstrap takes about a minute)."""
        key = hashlib.sha256(" ".join(BASE_PACKAGES).encode() + HOST_CA_BUNDLE.read_bytes()).hexdigest()[:16]
        tarball = cache_dir / f"bookworm-{key}.tar"
        if not tarball.exists():
            cache_dir.mkdir(parents=True, exist_ok=True)
            rootfs = self.root / "rootfs"
            run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", "bookworm",
                 str(rootfs)], timeout=900)  # fmt: skip
            # As the official python image has it: `python` and `pip` on PATH, pip free to install system-wide.
            for name, target in (("python", "python3"), ("pip", "pip3")):
                if not (rootfs / "usr/bin" / name).exists():
                    (rootfs / "usr/bin" / name).symlink_to(target)
            (rootfs / "usr/lib/python3.11/EXTERNALLY-MANAGED").unlink(missing_ok=True)
            shutil.copyfile(HOST_CA_BUNDLE, rootfs / "etc/ssl/certs/ca-certificates.crt")
            (rootfs / "data").mkdir(exist_ok=True)
            for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
                shutil.rmtree(rootfs / leftover, ignore_errors=True)
            partial = tarball.with_suffix(".part")
            run(["tar", "-C", str(rootfs), "-cf", str(partial), "."], timeout=300)
            partial.rename(tarball)
            shutil.rmtree(rootfs, ignore_errors=True)
        path = "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        images = {"python:3.11-slim": [path, "ENV LANG=C.UTF-8", 'CMD ["python3"]'],
                  "redis:7": [path, "WORKDIR /data", 'CMD ["redis-server"]']}  # fmt: skip
        for name, changes in images.items():
            args = [
                "docker",
                "import",
                *(arg for change in changes for arg in ("--change", change)),
                str(tarball),
                name,
            ]
            run(args, env=self.env, timeout=300)

    def stop(self) -> None:
        """Stop every container, the engine, and remove its directories."""
        if self._proc is not None and self._proc.poll() is None:
            ids = self.docker("ps", "-aq", check=False, timeout=60).stdout.split()
            if ids:
                self.docker("rm", "-f", *ids, check=False, timeout=300)
            self._proc.terminate()
            try:
                self._proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=30)
        # Mounts an engine left behind (overlay layers, netns files) must go before the directory can.
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
                  if line.split()[1].startswith(str(self.root))]  # fmt: skip
        for mount in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", mount], capture_output=True, check=False)
        shutil.rmtree(self.root, ignore_errors=True)
