"""A real two-node Ray cluster on this machine, for submitting jobs as on a cluster.

    with LocalCluster() as cluster:          # or the `local_cluster` fixture
        proc = cluster.submit(["python", "jobs/data.py", "ultrafeedback-sample", "--out", out])

The head (`ray start --head`) and a second node (`ray start --address`, with the custom resource
`worker_node`) each run as `ray start --block` in their own session, with a temp dir of their own.

Teardown never calls `ray stop`: it stops every Ray process on the machine (it matches process
names), other people's local instances included. Instead we SIGTERM our two `ray start --block`
processes, which then stop what they started, and kill whatever is left of their process trees
and of the processes that name our temp dir on their command line.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    def __init__(self, num_cpus_per_node: int = 1, object_store_mb: int = 200, start_timeout: float = 180):
        self.num_cpus = num_cpus_per_node
        self.object_store_bytes = object_store_mb << 20
        self.start_timeout = start_timeout
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        # Short: Ray puts unix sockets under it, and socket paths are limited to 107 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="sp2c-", dir="/tmp")
        self.procs: list[subprocess.Popen] = []
        self.env = self._env()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        # Job drivers run `python ...`: it must be this venv's, with this package.
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   RAY_ENABLE_UV_RUN_RUNTIME_ENV="0", RAY_USAGE_STATS_ENABLED="0",
                   # On SIGTERM a node first drains (for Serve upgrades); a test cluster just stops.
                   RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
        # Ray 2.60 turns token authentication on for new local clusters and reads the token from
        # ~/.ray unless told otherwise: give this cluster its own token, shared by its nodes and
        # by the `ray job` clients, so nothing depends on (or touches) the user's ~/.ray.
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex + uuid.uuid4().hex)
        env.pop("RAY_AUTH_TOKEN_PATH", None)
        return env

    def _start(self, args: list[str], log_name: str) -> subprocess.Popen:
        log = open(Path(self.temp_dir) / log_name, "wb")
        proc = subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", *args], env=self.env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def _wait_for(self, what: str, ready, proc: subprocess.Popen, log_name: str) -> Any:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode}:\n{self.log(log_name)[-3000:]}")
            try:
                value = ready()
                if value:
                    return value
            except Exception:
                pass
            time.sleep(1)
        raise TimeoutError(f"{what} not ready after {self.start_timeout} s:\n{self.log(log_name)[-3000:]}")

    @staticmethod
    def _node_ports() -> list[str]:
        # Ray's fixed defaults (dashboard agent 52365, ...) collide with any other Ray instance on
        # the machine and with our own second node: every node gets free ports of its own.
        flags = ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
                 "--runtime-env-agent-port", "--node-manager-port", "--object-manager-port"]
        return [arg for flag in flags for arg in (flag, str(free_port()))]

    def log(self, name: str) -> str:
        path = Path(self.temp_dir) / name
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> "LocalCluster":
        common = ["--num-cpus", str(self.num_cpus), "--object-store-memory", str(self.object_store_bytes),
                  "--temp-dir", self.temp_dir, "--node-ip-address", "127.0.0.1"]
        head = self._start(["--head", "--port", str(self.gcs_port), "--dashboard-host", "127.0.0.1",
                            "--dashboard-port", str(self.dashboard_port), "--include-dashboard", "true",
                            "--ray-client-server-port", str(free_port()), *self._node_ports(), *common], "head.log")
        self._wait_for("the head node", lambda: "Ray runtime started" in self.log("head.log"), head, "head.log")
        worker = self._start(["--address", self.address, "--resources", json.dumps({"worker_node": 1}),
                              *self._node_ports(), *common], "worker.log")
        self._wait_for("the second node", lambda: len(self.alive_nodes()) == 2, worker, "worker.log")
        self._wait_for("the job server", self._jobs_api_ready, head, "head.log")
        return self

    def _get(self, path: str) -> Any:
        # Plain HTTP with this cluster's token: the Ray clients in this process would read the
        # token from os.environ / ~/.ray, which belong to the test session, not to this cluster.
        import httpx

        headers = {"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"}
        response = httpx.get(f"{self.dashboard_url}{path}", headers=headers, timeout=10)
        response.raise_for_status()
        return response.json()

    def alive_nodes(self) -> list[dict]:
        nodes = self._get("/api/v0/nodes?limit=100&detail=true")["data"]["result"]["result"]
        return [n for n in nodes if n["state"] == "ALIVE"]

    def _jobs_api_ready(self) -> bool:
        return isinstance(self._get("/api/jobs/"), list)

    def submit(self, entrypoint: list[str], runtime_env: dict | None = None, timeout: float = 600,
               wait: bool = True, submission_id: str | None = None) -> subprocess.CompletedProcess:
        """`ray job submit` of `entrypoint` with this repository as the working dir."""
        env = {"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}, **(runtime_env or {})}
        cmd = [RAY, "job", "submit", "--address", self.dashboard_url, "--working-dir", str(REPO),
               "--runtime-env-json", json.dumps(env),
               "--submission-id", submission_id or f"sp2dpo-test-{uuid.uuid4().hex[:8]}"]
        if not wait:
            cmd.append("--no-wait")
        deadline = time.monotonic() + timeout
        while True:
            proc = subprocess.run([*cmd, "--", *entrypoint], env=self.env, capture_output=True, text=True,
                                  timeout=max(1.0, deadline - time.monotonic()), cwd=REPO)
            # The head's dashboard agent registers a little after the job API answers.
            if "No available agent to submit job" not in proc.stderr or time.monotonic() > deadline - 30:
                return proc
            time.sleep(2)

    def job(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """`ray job <args>` against this cluster (status, logs, stop, ...)."""
        return subprocess.run([RAY, "job", *args, "--address", self.dashboard_url], env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def _our_processes(self) -> list[psutil.Process]:
        ours: dict[int, psutil.Process] = {}
        for proc in self.procs:
            try:
                root = psutil.Process(proc.pid)
                for p in [root, *root.children(recursive=True)]:
                    ours[p.pid] = p
            except psutil.NoSuchProcess:
                pass
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(self.temp_dir in arg for arg in p.info["cmdline"] or []):
                    ours[p.pid] = p
            except (psutil.Error, TypeError):
                pass
        ours.pop(os.getpid(), None)
        return list(ours.values())

    def stop(self, grace_s: float = 20) -> None:
        leftovers = self._our_processes()
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        # A test cluster needs no more grace than that: kill what is left of ours.
        leftovers = list({p.pid: p for p in leftovers + self._our_processes()}.values())
        for p in leftovers:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(leftovers, timeout=10)
        for proc in self.procs:
            proc.wait(timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "LocalCluster":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: Any) -> None:
        self.stop()


@pytest.fixture(scope="module")
def local_cluster():
    with LocalCluster() as cluster:
        yield cluster
