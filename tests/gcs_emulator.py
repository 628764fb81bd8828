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

For the tests of pod-scale model files (`start_counting_emulator`), the same wrapper can also serve the one
in-memory bucket store on several ports (one per client process, so that what each process downloads is told
apart), count the object bytes each port serves into a JSON file, and answer every n-th ranged download with a
503 once (a transient error: the same range asked again is served).
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

import json, os, threading  # noqa: E401,E402
from http import HTTPStatus  # noqa: E402

COUNTS = os.environ.get("RPO_JAX_EMULATOR_COUNTS", "")
FAIL_EVERY = int(os.environ.get("RPO_JAX_EMULATOR_FAIL_EVERY", "0"))
EXTRA_PORTS = [int(p) for p in os.environ.get("RPO_JAX_EMULATOR_EXTRA_PORTS", "").split(",") if p]
lock = threading.Lock()
served = {}
ranged = [0]
failed_once = set()


def record(port, **add):
    with lock:
        entry = served.setdefault(str(port), {"bytes": 0, "downloads": 0, "failed": 0})
        for k, v in add.items():
            entry[k] += v
        if COUNTS:
            with open(COUNTS + ".tmp", "w") as f:
                json.dump(served, f)
            os.replace(COUNTS + ".tmp", COUNTS)


counted_download = objects.download


def download_counted(request, response, storage, *args, **kwargs):
    port = request._server_address[1]
    rng = request.get_header("range", None)
    if FAIL_EVERY and rng:
        key = (request.params["object_id"], rng)
        with lock:
            ranged[0] += 1
            fail = ranged[0] % FAIL_EVERY == 0 and key not in failed_once
            if fail:
                failed_once.add(key)
        if fail:
            record(port, failed=1)
            response.status = HTTPStatus.SERVICE_UNAVAILABLE
            response.json({"error": {"code": 503, "message": "injected transient error"}})
            return None
    write_file = response.write_file

    def counting_write_file(content, *a, **k):
        record(port, bytes=len(content), downloads=1)
        return write_file(content, *a, **k)

    response.write_file = counting_write_file
    return counted_download(request, response, storage, *args, **kwargs)


if COUNTS or FAIL_EVERY or EXTRA_PORTS:
    objects.download = download_counted
    from gcp_storage_emulator import server as emulator_server  # after: its routes read objects.download

    class Server(emulator_server.server.ThreadingHTTPServer):  # concurrent range reads
        # socketserver's listen backlog of 5 overflows under two processes' concurrent range reads: the kernel
        # then drops handshakes ("SYN flooding" in dmesg) and clients wait out TCP's retransmission back-off
        request_queue_size = 256

    emulator_server.server.HTTPServer = Server

    start = emulator_server.Server.start

    def start_with_extra_ports(self):
        start(self)
        for port in EXTRA_PORTS:
            thread = emulator_server.APIThread("127.0.0.1", port, self._storage, daemon=True)
            thread.start()
            thread.is_running.wait()

    emulator_server.Server.start = start_with_extra_ports

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


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def start_counting_emulator(
    processes: int, counts_file: str, fail_every: int = 0, timeout_s: float = 60.0
) -> tuple[subprocess.Popen, list[dict[str, str]]]:
    """(the emulator process, one environment per client process): one store served on `processes` ports, the
    object bytes served on each counted into `counts_file` ({port: {"bytes", "downloads", "failed"}}); with
    `fail_every` = n > 0 every n-th ranged download is answered 503 once. The first environment is also the one
    to upload with (its port's counts include those uploads' reads, if any)."""
    ports = [free_port() for _ in range(processes)]
    env = {
        **os.environ,
        "RPO_JAX_EMULATOR_COUNTS": counts_file,
        "RPO_JAX_EMULATOR_FAIL_EVERY": str(fail_every),
        "RPO_JAX_EMULATOR_EXTRA_PORTS": ",".join(str(p) for p in ports[1:]),
    }
    cmd = [sys.executable, "-c", EMULATOR_MAIN, "start", "--host=127.0.0.1", f"--port={ports[0]}", "--in-memory"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + timeout_s
    while not all(_answers(p) for p in ports):
        if proc.poll() is not None:
            raise RuntimeError(f"gcp-storage-emulator exited with status {proc.returncode}")
        if time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"gcp-storage-emulator did not answer on ports {ports} within {timeout_s} s")
        time.sleep(0.1)
    return proc, [emulator_environment(p) for p in ports]


def served_bytes(counts_file: str, env: dict[str, str]) -> dict[str, int]:
    """{"bytes", "downloads", "failed"} served on `env`'s port so far (zeros before its first download)."""
    import json

    port = env["STORAGE_EMULATOR_HOST"].rsplit(":", 1)[1]
    try:
        with open(counts_file) as f:
            counts = json.load(f)
    except FileNotFoundError:
        counts = {}
    return counts.get(port, {"bytes": 0, "downloads": 0, "failed": 0})


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


def restore_environment(saved: dict[str, str | None]) -> None:
    """Put back the variables `saved` before `use_in_this_process` ({name: value, None: it was unset})."""
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
