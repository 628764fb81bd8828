"""Test set-up: 8 fake CPU devices, set before JAX initialises."""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# A persistent compilation cache shared by the tests and the processes they start: the same small programs
# are compiled by many tests.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "rpo_jax", "jax_test_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)

import pathlib  # noqa: E402
import subprocess  # noqa: E402

import pytest  # noqa: E402

_SMOLLM2_SCRIPT = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "models" / "make_smollm2.sh"


@pytest.fixture(scope="session")
def smollm2_dir() -> pathlib.Path:
    """The real SmolLM2-135M-Instruct checkpoint as a Hugging Face directory (slow tests only).

    Built offline by ``../shared/models/make_smollm2.sh`` (about 2 minutes the first time), or taken from
    ``$RPO_JAX_SMOLLM2`` when that names an existing directory.
    """
    env = os.environ.get("RPO_JAX_SMOLLM2")
    if env and (pathlib.Path(env) / "model.safetensors").exists():
        return pathlib.Path(env)
    if not _SMOLLM2_SCRIPT.exists():
        pytest.skip(f"SmolLM2 builder not found at {_SMOLLM2_SCRIPT}; set RPO_JAX_SMOLLM2 to a checkpoint dir")
    out = subprocess.run(["bash", str(_SMOLLM2_SCRIPT)], check=True, capture_output=True, text=True).stdout
    return pathlib.Path(out.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def gcs_emulator():
    """A local GCS API (tests/gcs_emulator.py) for the whole session; its environment is set in this process
    (so processes started by the tests inherit it). Yields that environment."""
    from tests.gcs_emulator import restore_environment, start_emulator, use_in_this_process

    proc, env = start_emulator()
    saved = {k: os.environ.get(k) for k in env}
    use_in_this_process(env)
    try:
        yield env
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        restore_environment(saved)


@pytest.fixture
def gcs_bucket(gcs_emulator) -> str:
    """`gs://NAME`: a new, empty bucket in the session's emulator."""
    from tests.gcs_emulator import create_bucket

    return f"gs://{create_bucket(gcs_emulator)}"
