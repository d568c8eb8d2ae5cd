"""Shared fixtures. Models come from the bundled SmolLM2 (converted once, cached); nothing is
downloaded. A local Ray instance is started once per test session and shared."""

from __future__ import annotations

import os

import pytest

# Tests never reach a hub: fail loudly instead of hanging on a download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("SP2DPO_RAY_OBJECT_STORE_MB", "1024")

# The test S3 server's address and dummy credentials, before any Ray instance starts (its workers
# inherit them); the server itself starts when a test first asks for the `s3` fixture.
from s3_server import S3Server, install_env  # noqa: E402

S3_PORT = install_env()


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (runs on the lent GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """A serve engine built in the test process sets torch's intra-op threads process-wide (as it
    should in its own replica). Put them back, or every later test runs torch on one core."""
    import torch

    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session (2 CPUs here)."""
    import ray

    from sp2dpo.utils import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3():
    """A real S3 API server on 127.0.0.1 (moto), with one bucket; see tests/s3_server.py."""
    with S3Server(S3_PORT) as server:
        yield server


@pytest.fixture(scope="session")
def sample_pairs_dir(tmp_path_factory):
    """The bundled UltraFeedback sample prepared once: a directory holding pairs.parquet (read only)."""
    from sp2dpo.data.prepare import DataConfig, prepare

    out = tmp_path_factory.mktemp("sample-pairs")
    prepare(DataConfig(inputs=["ultrafeedback-sample"], out=str(out)), show_progress=False)
    return out


@pytest.fixture(scope="session")
def smollm2_dir():
    from sp2dpo.models import bundled_model_dir

    return bundled_model_dir()


@pytest.fixture(scope="session")
def tiny_model_dir():
    from sp2dpo.models import tiny_model_dir

    return tiny_model_dir()


@pytest.fixture(scope="session")
def tiny_student_on_s3(s3, tiny_model_dir):
    """The tiny random student, uploaded to S3: the worker node cannot read the head's model
    cache, so the model travels as it would on a cluster (each node stages its own copy). Tiny,
    because moto serves a 0.5 GB SmolLM2 checkpoint at a few MB/s and checkpoints of 1.6 GB
    (weights + AdamW state) grow its memory by GBs; the judge is still the bundled SmolLM2,
    which the worker converts for itself."""
    from sp2dpo.storage import upload_dir

    uri = s3.new_prefix("models") + "/tiny-student"
    upload_dir(str(tiny_model_dir), uri)
    return uri
