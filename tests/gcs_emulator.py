"""A local Google Cloud Storage API for the tests: `gcp-storage-emulator` on a loopback port, in memory.

`start_emulator()` starts it and returns the environment that points every client at it (the standard
variables: gcsfs and google-cloud-storage read `STORAGE_EMULATOR_HOST`, TensorStore — orbax's array storage —
reads `TENSORSTORE_GCS_HTTP_URL`; anonymous tokens; gcsfs's hierarchical-namespace probe, which would stall
60 s on gRPC, off). The `gcs_bucket` fixture of tests/conftest.py sets that environment for the test process
and the processes it starts, and creates one bucket through the API.

One gap of the emulator is filled (`EMULATOR_MAIN`): real GCS answers a media download with the object's
`x-goog-generation` / `x-goog-metageneration` headers, which TensorStore reads to update OCDBT manifests with
conditional writes ("Malformed StorageGeneration" without them); the emulator's download handler leaves them
out, so the emulator is started with its handler wrapped to add them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid

EMULATOR_MAIN = """
import sys
from gcp_storage_emulator.handlers import objects

original_download = objects.download


def download(request, response, storage, *args, **kwargs):
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj["metageneration"])
    except Exception:  # a missing object: the original handler answers 404
        pass
    return original_download(request, response, storage, *args, **kwargs)


objects.download = download
from gcp_storage_emulator.__main__ import main  # noqa: E402 - the server's routes read objects.download
main(sys.argv[1:])
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def emulator_environment(port: int) -> dict[str, str]:
    """The variables that send gcsfs, google-cloud-storage and TensorStore to the emulator on `port`."""
    url = f"http://127.0.0.1:{port}"
    return {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "FSSPEC_GS_TOKEN": "anon",
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake",
        "GOOGLE_CLOUD_PROJECT": "rpo-jax-test",
    }


def start_emulator(timeout_s: float = 60.0) -> tuple[subprocess.Popen, dict[str, str]]:
    """(the emulator process, its environment) once it answers on its port."""
    port = free_port()
    cmd = [sys.executable, "-c", EMULATOR_MAIN, "start", "--host=127.0.0.1", f"--port={port}", "--in-memory"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gcp-storage-emulator exited with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, emulator_environment(port)
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"gcp-storage-emulator did not answer on port {port} within {timeout_s} s")


def create_bucket(env: dict[str, str], name: str | None = None) -> str:
    """Create a bucket through the storage API (google-cloud-storage, anonymous); returns its name."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    name = name or f"rpo-jax-{uuid.uuid4().hex[:12]}"
    client = storage.Client(
        project=env["GOOGLE_CLOUD_PROJECT"],
        credentials=AnonymousCredentials(),
        client_options={"api_endpoint": env["STORAGE_EMULATOR_HOST"]},
    )
    client.create_bucket(name)
    return name


def use_in_this_process(env: dict[str, str]) -> None:
    """Set `env` here, also where fsspec already read its configuration from the environment at import; and
    no cached listings in the test process, which watches a bucket that other processes write."""
    os.environ.update(env)
    import fsspec.config

    for protocol in ("gs", "gcs"):
        fsspec.config.conf.setdefault(protocol, {}).update(token="anon", use_listings_cache=False)
