"""A real S3 API server on 127.0.0.1 for the tests: moto's standalone server, no mocked client.

    with S3Server() as s3:                       # or the `s3` fixture (tests/conftest.py)
        uri = s3.new_prefix("run")               # s3://sp2dpo-test/run-<random>
        ...pyarrow, boto3, Ray Train and every sp2dpo stage reach it through s3.env

Clients find it the standard way: `AWS_ENDPOINT_URL` plus dummy credentials in the environment
(`s3.env`). The conftest puts them in `os.environ` when it is imported, before any Ray instance
starts, so Ray workers and job drivers inherit them; the server itself starts on first use.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

BUCKET = "sp2dpo-test"


_PORTS_GIVEN: set[int] = set()


def free_port() -> int:
    """A port free on 127.0.0.1 now and not handed out before in this process.

    The OS may return a port it just returned again once that socket closes; a cluster given the
    same number for two of its components refuses to start ("trying to use a port number ... that
    is used by other components")."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _PORTS_GIVEN:
            _PORTS_GIVEN.add(port)
            return port


def s3_env(port: int) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "sp2dpo-test-key",
        "AWS_SECRET_ACCESS_KEY": "sp2dpo-test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        # No instance-metadata lookups (they time out slowly off a cloud machine).
        "AWS_EC2_METADATA_DISABLED": "true",
    }


class S3Server:
    def __init__(self, port: int | None = None, bucket: str = BUCKET):
        self.port = port or free_port()
        self.bucket = bucket
        self.env = s3_env(self.port)
        self.proc: subprocess.Popen | None = None
        self.log_path = Path(tempfile.mkdtemp(prefix="sp2dpo-s3-")) / "moto.log"

    @property
    def endpoint(self) -> str:
        return self.env["AWS_ENDPOINT_URL"]

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")

    def start(self, timeout: float = 60) -> S3Server:
        server = Path(sys.executable).parent / "moto_server"
        log = open(self.log_path, "wb")
        # moto builds each multipart upload in memory; glibc's default thresholds then keep the
        # freed arenas (measured: 9.8 GB over a SmolLM2 demo run, 0.2-0.6 GB with these).
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_TRIM_THRESHOLD_": "1048576"}
        self.proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(self.port)], stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True, env=env)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            try:
                self.client().create_bucket(Bucket=self.bucket)
                return self
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

    def new_prefix(self, name: str = "t") -> str:
        return f"s3://{self.bucket}/{name}-{uuid.uuid4().hex[:8]}"

    def keys(self, uri: str) -> list[str]:
        """Every object key under an `s3://bucket/prefix` URI (what is really on the server), less
        the empty directory-marker objects pyarrow creates."""
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/")
        keys = (o["Key"][len(prefix.rstrip("/")) + 1:] for page in pages for o in page.get("Contents", []))
        return sorted(k for k in keys if k and not k.endswith("/"))

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def install_env(port: int | None = None) -> int:
    """Point this process (and what it starts) at a test S3 server on `port`; returns the port.
    Called by the conftest at import time; `SP2DPO_TEST_S3_PORT` lets child processes agree."""
    port = port or int(os.environ.get("SP2DPO_TEST_S3_PORT") or free_port())
    os.environ["SP2DPO_TEST_S3_PORT"] = str(port)
    os.environ.update(s3_env(port))
    return port
