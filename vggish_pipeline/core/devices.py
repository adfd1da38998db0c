"""The devices a worker can be pinned to, found without TensorFlow (which must not see them yet).

One model for every command: the GPUs and MIG slices `nvidia-smi -L` lists, narrowed to those
CUDA_VISIBLE_DEVICES grants (indices or UUIDs, by CUDA's own rules), each with the CPUs that
`nvidia-smi topo -m` reports near it. A GPU split into MIG slices is not a device itself; each
slice is. A worker is pinned to exactly one device by its UUID, so CUDA's device order never
decides which GPU it gets.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from vggish_pipeline.core.errors import DeviceError
from vggish_pipeline.core.settings import NVIDIA_SMI_TIMEOUT_DEFAULT

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = NVIDIA_SMI_TIMEOUT_DEFAULT

GPU_LINE = re.compile(r"^GPU (\d+): (.*?) \(UUID: ([^)]+)\)")
MIG_LINE = re.compile(r"^\s+MIG (\S+)\s+Device\s+(\d+): \(UUID: ([^)]+)\)")


@dataclass(frozen=True)
class Device:
    """One GPU or MIG slice: nvidia-smi's index ("2", or "2:1" for slice 1 of GPU 2), UUID and name."""

    index: str
    uuid: str
    name: str
    parent: str | None = None  # the GPU's UUID, for a MIG slice
    cpus: tuple[int, ...] = ()  # the CPUs nvidia-smi reports near it; empty when it reports none

    @property
    def short(self) -> str:
        """For worker names: gpu2, or gpu2-mig1 for a MIG slice."""
        gpu, _, mig = self.index.partition(":")
        return f"gpu{gpu}" + (f"-mig{mig}" if mig else "")

    def describe(self) -> str:
        return f"GPU {self.index} {self.name} ({self.uuid})"

    def env(self) -> dict[str, str]:
        """What pins a process to this device: its UUID, which means the same under any device order."""
        return {"CUDA_VISIBLE_DEVICES": self.uuid, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


@dataclass(frozen=True)
class Discovery:
    """What this machine grants: its devices, and why there are none or fewer than listed."""

    devices: list[Device]
    notes: list[str]
    unanswered: bool = False  # nvidia-smi is there but failed or hung: the devices are unknown, not absent

    def say(self, out=None) -> None:
        for note in self.notes:
            print(note, file=out or sys.stderr)


ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")  # colour and underline codes, as in `topo -m`'s header
QUERY = ("--query-gpu=index,uuid,name,mig.mode.current", "--format=csv,noheader")


@dataclass(frozen=True)
class Answer:
    """What nvidia-smi printed, ANSI codes stripped, and its exit code."""

    args: tuple[str, ...]
    out: str
    err: str
    code: int

    def failure(self) -> str:
        first = (self.err or self.out).strip().splitlines()
        return f"nvidia-smi {' '.join(self.args)} failed (exit {self.code}): {first[0] if first else ''}"


def nvidia_smi(*args: str, timeout: float = DEFAULT_TIMEOUT) -> Answer:
    """Run nvidia-smi; OSError (FileNotFoundError: none here) or TimeoutError say why it gave no answer.

    A wedged driver can leave nvidia-smi hanging, even unkillable: on timeout its whole process
    group is killed and nothing more is waited for, so this never blocks longer than `timeout`.
    A non-zero exit is an answer too: one GPU fallen off the bus still leaves the others listed.
    """
    proc = subprocess.Popen(
        ["nvidia-smi", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()
        try:
            proc.wait(0.5)
        except subprocess.TimeoutExpired:
            pass  # left to the kernel; it is reaped if it ever leaves
        raise TimeoutError(f"nvidia-smi {' '.join(args)} did not answer in {timeout:g} s") from None
    return Answer(args, ANSI.sub("", out), ANSI.sub("", err), proc.returncode)


class NvidiaSmiError(ValueError):
    """nvidia-smi failed, or printed what this project cannot read (its text output may change between drivers)."""


@dataclass(frozen=True)
class Gpu:
    """One row of `nvidia-smi --query-gpu=index,uuid,name,mig.mode.current`."""

    index: str
    uuid: str
    name: str
    mig: bool


QUERY_ROW = re.compile(r"^\s*(\d+)\s*,\s*(GPU-[^,\s]+)\s*,\s*(.*?)\s*,\s*([^,]*?)\s*$")


def parse_query(text: str, strict: bool = True) -> tuple[list[Gpu], list[str]]:
    """GPUs from the query's CSV rows, and the other lines. `strict` (a zero exit): any other line
    is unreadable output; otherwise (a failing GPU) those lines are nvidia-smi's own errors."""
    gpus, other = [], []
    for line in (raw.strip() for raw in text.splitlines()):
        if not line:
            continue
        if m := QUERY_ROW.match(line):
            gpus.append(Gpu(m[1], m[2], m[3], m[4].lower() == "enabled"))
        elif strict:
            raise NvidiaSmiError(f"unexpected line in nvidia-smi {' '.join(QUERY)}: {line[:120]!r}")
        else:
            other.append(line)
    return gpus, other


def parse_list(listing: str) -> dict[str, list[Device]]:
    """The MIG slices `nvidia-smi -L` lists under each GPU, by the GPU's UUID."""
    slices: dict[str, list[Device]] = {}
    gpu: tuple[str, str, str] | None = None
    for line in ANSI.sub("", listing).splitlines():
        if m := GPU_LINE.match(line):
            gpu = (m[1], m[3].strip(), m[2].strip())
            slices.setdefault(gpu[1], [])
        elif (m := MIG_LINE.match(line)) and gpu:
            index, uuid, name = gpu
            slices[uuid].append(Device(f"{index}:{m[2]}", m[3].strip(), f"MIG {m[1]} of {name}", parent=uuid))
    return slices


def usable(gpus: list[Gpu], slices: dict[str, list[Device]]) -> tuple[list[Device], list[str]]:
    """Each GPU, or instead of a GPU in MIG mode each of its slices; a MIG GPU with no slice is no device."""
    devices, notes = [], []
    for gpu in gpus:
        if not gpu.mig:
            devices.append(Device(gpu.index, gpu.uuid, gpu.name))
        elif slices.get(gpu.uuid):
            devices.extend(slices[gpu.uuid])
        else:
            notes.append(f"GPU {gpu.index} {gpu.name} ({gpu.uuid}) is in MIG mode with no MIG devices: not used "
                         "(create them with `nvidia-smi mig -cgi PROFILES -C`)")
    return devices, notes


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """'0-13,28-41' as CPU numbers; () for N/A or anything else unreadable."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            return ()
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return tuple(cpus)


def parse_topology(matrix: str) -> dict[str, tuple[int, ...]]:
    """nvidia-smi index -> the CPUs of its 'CPU Affinity' column in `nvidia-smi topo -m`."""
    lines = [line for line in ANSI.sub("", matrix).splitlines() if line.strip()]
    header = next(([cell.strip() for cell in line.split("\t")] for line in lines if "CPU Affinity" in line), None)
    if header is None:
        return {}
    if "CPU Affinity" not in header:
        raise NvidiaSmiError("the 'CPU Affinity' column of nvidia-smi topo -m is not a tab-separated cell")
    column = header.index("CPU Affinity")
    near = {}
    for line in lines:
        cells = line.split("\t")
        if re.fullmatch(r"GPU\d+", cells[0].strip()) and len(cells) > column:
            near[cells[0].strip()[3:]] = parse_cpu_list(cells[column])
    return near


def granted(devices: list[Device], visible: str | None) -> tuple[list[Device], list[str]]:
    """The devices CUDA_VISIBLE_DEVICES grants, in its order, by CUDA's rules: unset grants all;
    empty or -1 grants none; entries are indices or (unique prefixes of) UUIDs; the first entry
    that names no device ends the list. A GPU in MIG mode named there grants its slices."""
    if visible is None:
        return devices, []
    chosen: list[Device] = []
    entries = [e.strip() for e in visible.split(",")]
    for i, entry in enumerate(entries):
        matches = match(entry, devices)
        if not matches:
            notes = []
            if entry not in ("", "-1") or any(e not in ("", "-1") for e in entries[i + 1 :]):
                dropped = ",".join(entries[i:])
                notes.append(f"CUDA_VISIBLE_DEVICES={visible}: {entry!r} names no GPU nvidia-smi lists, so CUDA ignores {dropped}")
            return chosen, notes
        chosen.extend(d for d in matches if d not in chosen)
    return chosen, []


def match(spec: str, devices: list[Device]) -> list[Device]:
    """The devices `spec` names: an index ("2" or "2:1"), a UUID or a unique UUID prefix; a GPU
    in MIG mode stands for its slices."""
    if re.fullmatch(r"\d+", spec):
        return [d for d in devices if d.index == spec or d.index.startswith(spec + ":")]
    if re.fullmatch(r"\d+:\d+", spec):
        return [d for d in devices if d.index == spec]
    if not spec.upper().startswith(("GPU-", "MIG-")):
        return []
    exact = [d for d in devices if spec in (d.uuid, d.parent)]
    if exact:
        return exact
    prefixed = {d.uuid for d in devices if d.uuid.startswith(spec)} | {d.parent for d in devices if d.parent and d.parent.startswith(spec)}
    if len(prefixed) != 1:
        return []  # no device, or not unique: CUDA refuses an ambiguous prefix too
    (uuid,) = prefixed
    return [d for d in devices if uuid in (d.uuid, d.parent)]


def discover(timeout: float = DEFAULT_TIMEOUT, env: Mapping[str, str] | None = None) -> Discovery:
    """Every device this process may use, with the CPUs near each. No nvidia-smi, a failing or
    a hanging one (past `timeout` seconds), or output it cannot read all mean no GPUs, with a note
    saying which (never a traceback); a non-zero exit keeps the GPUs it still listed, and says so."""
    env = os.environ if env is None else env
    if env.get("CUDA_VISIBLE_DEVICES", "x").strip() in ("", "-1"):
        return Discovery([], [])  # none granted: nvidia-smi need not be asked
    try:
        listed, notes = listed_devices(timeout)
    except FileNotFoundError:
        return Discovery([], [])  # no NVIDIA driver here: a CPU machine, nothing to say
    except (OSError, TimeoutError, NvidiaSmiError) as e:
        return Discovery([], [f"no GPUs used: {e}"], unanswered=True)
    if not listed:
        return Discovery([], notes)
    devices, granting = granted(listed, env.get("CUDA_VISIBLE_DEVICES"))
    notes += granting
    if not devices:
        return Discovery([], notes)
    mixed = len({d.name for d in listed if d.parent is None}) > 1
    if mixed and env.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID" and re.search(r"(^|,)\s*\d", env.get("CUDA_VISIBLE_DEVICES", "")):
        notes.append(
            "CUDA_VISIBLE_DEVICES gives indices on a machine with several GPU models: they are read as "
            "nvidia-smi's (PCI bus order), which CUDA uses only with CUDA_DEVICE_ORDER=PCI_BUS_ID; UUIDs are unambiguous"
        )
    try:
        answer = nvidia_smi("topo", "-m", timeout=timeout)
        if answer.code:
            raise NvidiaSmiError(answer.failure())
        near = parse_topology(answer.out)
    except (OSError, TimeoutError, NvidiaSmiError) as e:
        near = {}
        notes.append(f"CPU affinity not set: {e}")
    with_cpus = [Device(d.index, d.uuid, d.name, d.parent, near.get(d.index.split(":")[0], ())) for d in devices]
    return Discovery(with_cpus, notes)


def listed_devices(timeout: float) -> tuple[list[Device], list[str]]:
    """The devices nvidia-smi lists (`--query-gpu`, and `-L` for the slices of GPUs in MIG mode), with notes."""
    answer = nvidia_smi(*QUERY, timeout=timeout)
    gpus, errors = parse_query(answer.out, strict=not answer.code)
    notes = []
    if answer.code:
        said = "; ".join(errors) or answer.failure()
        if not gpus:
            raise NvidiaSmiError(answer.failure())
        notes.append(f"nvidia-smi exited {answer.code} but listed {len(gpus)} GPUs; those are used ({said[:300]})")
    slices: dict[str, list[Device]] = {}
    if any(gpu.mig for gpu in gpus):
        listing = nvidia_smi("-L", timeout=timeout)
        slices = parse_list(listing.out)
    devices, unusable = usable(gpus, slices)
    return devices, notes + unusable


def select(specs: str, discovery: Discovery) -> list[Device]:
    """The devices a comma-separated list of indices or UUIDs names among those granted ('all': every one)."""
    if specs.strip() == "all":
        if not discovery.devices:
            raise DeviceError("no GPU is granted to this process" + "".join(f"; {n}" for n in discovery.notes))
        return discovery.devices
    chosen: list[Device] = []
    for spec in (s.strip() for s in specs.split(",")):
        found = match(spec, discovery.devices)
        if not found:
            granted_list = ", ".join(f"{d.index} ({d.uuid})" for d in discovery.devices) or "none (no nvidia-smi, or it lists none)"
            raise DeviceError(f"GPU {spec!r} is not among the devices granted to this process: {granted_list}")
        chosen.extend(d for d in found if d not in chosen)
    return chosen


def pin_process(spec: str, timeout: float = DEFAULT_TIMEOUT) -> Device:
    """Pin this process to the one GPU or MIG slice `spec` names, and to the CPUs near it, before
    TensorFlow loads. If nvidia-smi cannot be asked now, pin by `spec` as given, unchecked."""
    discovery = discover(timeout)
    for note in discovery.notes:
        log.warning("%s", note)
    if discovery.unanswered:
        os.environ.update({"CUDA_VISIBLE_DEVICES": spec, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
        return Device("?", spec, "(not checked: nvidia-smi did not answer)")
    chosen = select(spec, discovery)
    if len(chosen) != 1:
        raise DeviceError(
            f"--gpu {spec} names {len(chosen)} MIG slices; give one: " + ", ".join(f"{d.index} ({d.uuid})" for d in chosen)
        )
    device = chosen[0]
    os.environ.update(device.env())
    pin_cpus(device.cpus)
    return device


def cpu_list(cpus: set[int]) -> str:
    """{0, 1, 2, 5} as '0-2,5'."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)


def pin_cpus(cpus: tuple[int, ...]) -> set[int] | None:
    """Run every thread of this process on `cpus`, within what it may use already; the set applied,
    or None when `cpus` is empty or shares nothing with what is allowed (then nothing changes)."""
    if not cpus or not hasattr(os, "sched_setaffinity"):
        return None
    allowed = os.sched_getaffinity(0) & set(cpus)
    if not allowed:
        return None
    for tid in os.listdir("/proc/self/task"):  # threads already started keep their own mask otherwise
        try:
            os.sched_setaffinity(int(tid), allowed)
        except OSError:
            pass  # a thread that just ended
    return allowed


def usable_cores() -> int:
    """The cores this process may run on (all of them where the OS cannot say, as on macOS)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def threads_per_worker(workers: int) -> int:
    """Split the cores this process may use evenly, so N CPU workers do not fight over them."""
    return max(1, usable_cores() // max(workers, 1))


MEMORY_GROWTH_ENV = "TF_FORCE_GPU_ALLOW_GROWTH"
CUDA_CACHE_BYTES = 4 << 30  # CUDA_CACHE_MAXSIZE's upper bound (4 GiB): room for every PTX kernel a first start on Hopper compiles


def runtime_env(cache_dir: Path, env: Mapping[str, str]) -> dict[str, str]:
    """What TensorFlow and CUDA must find in a worker's environment before they load, where the
    user has not set it: memory growth (TensorFlow would map nearly all of the GPU's memory, which
    breaks MIG instances sharing one GPU instance and a second worker on a device), and CUDA's JIT
    cache in this project's cache folder, large enough that a first start on a GPU newer than the
    wheel's kernels (Hopper) compiles them once per machine, not once per container."""
    wanted = {
        MEMORY_GROWTH_ENV: "true",
        "CUDA_CACHE_PATH": str(cache_dir / "cuda"),
        "CUDA_CACHE_MAXSIZE": str(CUDA_CACHE_BYTES),
    }
    return {name: value for name, value in wanted.items() if name not in env}


def memory_policy(env: Mapping[str, str], limit: int | None) -> str:
    """What a worker with `env` gets of its GPU's memory and CUDA's JIT cache, in words."""
    growth = env.get(MEMORY_GROWTH_ENV, "")
    cache = env.get("CUDA_CACHE_PATH", "~/.nv/ComputeCache")
    size = int(env.get("CUDA_CACHE_MAXSIZE", 0) or 256 << 20) >> 20  # CUDA's own default is 256 MiB
    return (f"growth {'on' if growth.lower() == 'true' else 'off'} ({MEMORY_GROWTH_ENV}={growth or '<unset>'}), "
            f"{f'limit {limit} MiB' if limit else 'no limit'}; CUDA JIT cache {cache} (up to {size} MiB)")
