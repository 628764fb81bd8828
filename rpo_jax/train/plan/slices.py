"""Cloud TPU slices for `rpo-plan`: each generation's published chip figures (`CHIPS`), accelerator
types → slice shapes (`parse_slice`), and one device per chip from libtpu's topology description
(`slice_devices`, no TPU needed).

On a machine without a TPU (`rpo_jax.train.runtime.processes.tpu_may_be_present`), libtpu is loaded with the
values it would otherwise look up on a TPU VM (`TPU_ACCELERATOR_TYPE` = the planned slice, `TPU_WORKER_ID=0`,
`TPU_WORKER_HOSTNAMES=localhost`, `TPU_SKIP_MDS_QUERY=1`; any the user set are kept, and all are restored
afterwards): without them it prints errors ("Failed to find host bounds …", "INVALID_ARGUMENT … Source
Location Trace") before the plan's report. The topology and the compiled programs are the same either way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re

from rpo_jax.train.runtime.processes import tpu_may_be_present

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published figures of one TPU generation (per chip), from the Cloud TPU system-architecture pages (v4:
    also the TPU v4 paper for the ICI links)."""

    generation: str  # libtpu topology prefix: "v4", "v5" (v5p), "v5e", "v6e"
    megacore: bool  # two TensorCores driven as one device (v4, v5p)
    mesh_dims: int  # 3-D torus (v4, v5p) or 2-D (v5e, v6e)
    hbm_bytes: float
    peak_bf16_flops: float
    hbm_bytes_per_s: float
    ici_bytes_per_s: float  # all ICI links of a chip together


CHIPS = {
    "v4": Chip("v4", True, 3, 32 * GiB, 275e12, 1200e9, 2400e9 / 8),
    "v5p": Chip("v5", True, 3, 95 * GiB, 459e12, 2765e9, 4800e9 / 8),
    "v5e": Chip("v5e", False, 2, 16 * GiB, 197e12, 819e9, 1600e9 / 8),
    "v6e": Chip("v6e", False, 2, 32 * GiB, 918e12, 1640e9, 3584e9 / 8),
}
#: accelerator-type prefixes → CHIPS key
ALIASES = {"v4": "v4", "v5p": "v5p", "v5litepod": "v5e", "v5e": "v5e", "v6e": "v6e"}
#: chips → slice shape (the shapes Cloud TPU provisions; larger v4/v5p slices are tori)
SHAPES_3D = {
    4: (2, 2, 1),
    8: (2, 2, 2),
    16: (2, 2, 4),
    32: (2, 4, 4),
    64: (4, 4, 4),
    128: (4, 4, 8),
    256: (4, 8, 8),
    512: (8, 8, 8),
    1024: (8, 8, 16),
    2048: (8, 16, 16),
    4096: (16, 16, 16),
}
SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}


@dataclasses.dataclass(frozen=True)
class Slice:
    accelerator: str
    chip: Chip
    num_chips: int
    shape: tuple[int, ...]

    @property
    def topology_name(self) -> str:
        return f"{self.chip.generation}:{'x'.join(map(str, self.shape))}"

    @property
    def wrap(self) -> tuple[bool, bool, bool]:
        """Torus links: v4/v5p slices of 64 chips and more wrap in every dimension; 2-D slices wrap along a
        dimension of 16 chips."""
        if self.chip.mesh_dims == 3:
            return (self.num_chips >= 64,) * 3
        return (self.shape[0] >= 16, self.shape[1] >= 16, False)


def parse_slice(name: str) -> Slice:
    """A Cloud TPU accelerator type (`v4-32`, `v5p-64`, `v5litepod-16` / `v5e-16`, `v6e-8`) → its Slice. The
    number counts TensorCores on v4/v5p (2 per chip) and chips on v5e/v6e. ValueError for anything else."""
    m = re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)-(\d+)", name.strip().lower())
    if not m:
        raise ValueError(
            f"--topology={name!r}: expected a Cloud TPU accelerator type such as v5p-64, v4-32, "
            "v5litepod-16 (v5e-16) or v6e-8"
        )
    chip = CHIPS[ALIASES[m.group(1)]]
    count = int(m.group(2))
    chips = count // 2 if chip.megacore else count
    shapes = SHAPES_3D if chip.mesh_dims == 3 else SHAPES_2D
    if (chip.megacore and count % 2) or chips not in shapes:
        sizes = sorted(c * (2 if chip.megacore else 1) for c in shapes)
        raise ValueError(f"--topology={name!r}: {m.group(1)} slices come in sizes {', '.join(map(str, sizes))}")
    return Slice(name, chip, chips, shapes[chips])


@contextlib.contextmanager
def libtpu_environment(slc: Slice):
    """Without a TPU here: the TPU VM values libtpu reads at start-up, set for the block (module docstring)."""
    if tpu_may_be_present():
        yield
        return
    values = {
        "TPU_SKIP_MDS_QUERY": "1",
        "TPU_ACCELERATOR_TYPE": slc.accelerator,
        "TPU_WORKER_ID": "0",
        "TPU_WORKER_HOSTNAMES": "localhost",
    }
    saved = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        os.environ.setdefault(k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def slice_devices(slc: Slice) -> list:
    """One device per chip of the slice, from libtpu's topology description (no TPU needed)."""
    from jax.experimental import topologies

    # compiling needs no TPU: let several planners (or a planner beside a TPU job) load libtpu at once
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    bounds = (2, 2, 1) if slc.num_chips >= 4 else (1, 1, 1)
    with libtpu_environment(slc):
        topology = topologies.get_topology_desc(
            platform="tpu",
            topology_name=slc.topology_name,
            chip_config_name="megacore" if slc.chip.megacore else "default",
            chips_per_host_bounds=bounds,
            num_slices=1,
            wrap=slc.wrap,
        )
    devices = list(topology.devices)
    if len(devices) != slc.num_chips:
        raise RuntimeError(f"{slc.accelerator}: libtpu describes {len(devices)} devices, expected {slc.num_chips}")
    return devices
