"""What the environment configures, read once at the edge (a CLI's main, an API call), checked,
and passed down: no other module reads these variables. A flag given on the command line wins
over its variable. A bad value is one line naming the variable, exit 2."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from vggish_pipeline.core.errors import InputError, UsageError
from vggish_pipeline.core.store import Location, location, roots

BROKER_ENV = "VGGISH_BROKER_URL"
PASSWORD_FILE_ENV = "VGGISH_BROKER_PASSWORD_FILE"
VISIBILITY_ENV = "VGGISH_VISIBILITY_TIMEOUT"
BROKER_TIMEOUT_ENV = "VGGISH_BROKER_TIMEOUT"
CA_ENV = "VGGISH_BROKER_CA"
CERT_ENV = "VGGISH_BROKER_CERT"
KEY_ENV = "VGGISH_BROKER_KEY"
CHECKPOINT_ENV = "VGGISH_CHECKPOINT"
DATA_ROOTS_ENV = "VGGISH_DATA_ROOTS"
NAME_ENV = "VGGISH_WORKER_NAME"
TF32_ENV = "VGGISH_TF32"
CACHE_ENV = "VGGISH_CACHE_DIR"
NVIDIA_SMI_TIMEOUT_ENV = "VGGISH_NVIDIA_SMI_TIMEOUT"
CPU_FALLBACK_ENV = "VGGISH_ALLOW_CPU_FALLBACK"
GPU_MEMORY_ENV = "VGGISH_GPU_MEMORY_LIMIT"
EXIT_WHEN_IDLE_ENV = "VGGISH_EXIT_WHEN_IDLE"
METRICS_ENV = "VGGISH_METRICS_PORT"
AUTOSCALE_ENV = "VGGISH_AUTOSCALE"
SCALE_IDLE_ENV = "VGGISH_SCALE_IDLE"
SCALE_IDLE_DEFAULT = 120.0  # seconds an autoscaled worker waits for a chunk before it leaves

VISIBILITY_DEFAULT = 3600  # seconds: kombu's default for Redis, and room for a chunk's first start on Hopper
BROKER_TIMEOUT_DEFAULT = 10.0
NVIDIA_SMI_TIMEOUT_DEFAULT = 15.0  # nvidia-smi without persistence mode can take seconds on a large machine

# For `--help` and the README: every variable, what it sets, its default.
VARIABLES = {
    BROKER_ENV: "broker URL, redis://[user[:password]@]host:port/db or redis+socket://PATH (flag --broker)",
    PASSWORD_FILE_ENV: "a file holding the broker password (one line), put into a URL given without one",
    VISIBILITY_ENV: f"seconds before Redis hands an unacknowledged chunk to another worker (default {VISIBILITY_DEFAULT})",
    BROKER_TIMEOUT_ENV: "seconds the broker may stay silent before a connection counts as lost and is made again "
    f"(default {BROKER_TIMEOUT_DEFAULT:g})",
    CA_ENV: "CA file that signed a rediss:// broker's certificate (flag --broker-ca; default: the system's CAs)",
    CERT_ENV: "client certificate, for a TLS broker that asks for one (flag --broker-cert)",
    KEY_ENV: "the client certificate's key (flag --broker-key)",
    CHECKPOINT_ENV: "VGGish checkpoint, a path or a URL (flag --checkpoint)",
    DATA_ROOTS_ENV: "folders or bucket prefixes (s3://bucket/jobs) a worker may read and write, separated by ':' "
                    "(flag --data-root; default: the current folder)",
    NAME_ENV: "a worker's name, e.g. gpu0@host (flag --name)",
    TF32_ENV: "1 lets workers compute in TF32 on Ampere and newer GPUs (flag --tf32; default 0)",
    CACHE_ENV: "what a machine keeps between starts: checkpoint digests and the fast V2 copy (default ~/.cache/vggish-pipeline)",
    NVIDIA_SMI_TIMEOUT_ENV: f"seconds nvidia-smi may take before it counts as hung (default {NVIDIA_SMI_TIMEOUT_DEFAULT:g})",
    CPU_FALLBACK_ENV: "1 lets a worker pinned to a GPU that TensorFlow cannot see compute on the CPU, ~100x slower (flag "
    "--allow-cpu-fallback; default 0: it stops at start with TensorFlow's reason)",
    GPU_MEMORY_ENV: "MiB of GPU memory each worker may take (flag --gpu-memory-limit; default: what it needs, grown on demand)",
    EXIT_WHEN_IDLE_ENV: "seconds a worker may go without a chunk before it leaves, with exit 0: for Slurm arrays and "
    "Kubernetes Jobs (flag --exit-when-idle; default: it stays)",
    METRICS_ENV: "port to serve Prometheus metrics on, at /metrics (flag --metrics-port; `worker up` gives its workers "
    "PORT, PORT+1…; `producer run` its own workers PORT+1…; default: none)",
    AUTOSCALE_ENV: "MIN:MAX: `worker up` starts workers on its devices as the backlog asks, and lets idle ones go, "
    "keeping MIN (flag --autoscale; default: every device, always)",
    SCALE_IDLE_ENV: f"seconds an autoscaled worker goes without a chunk before it leaves (flag --scale-idle; default "
    f"{SCALE_IDLE_DEFAULT:g})",
}

# Each Settings field a flag can set: the flag's argparse name. A flag given wins over its variable.
FLAGS = {
    "broker_url": "broker", "checkpoint": "checkpoint", "data_roots": "data_root", "worker_name": "name", "tf32": "tf32",
    "allow_cpu_fallback": "allow_cpu_fallback", "gpu_memory_limit": "gpu_memory_limit", "exit_when_idle": "exit_when_idle",
    "metrics_port": "metrics_port", "autoscale": "autoscale", "scale_idle": "scale_idle",
    "broker_ca": "broker_ca", "broker_cert": "broker_cert", "broker_key": "broker_key",
}

TRUE, FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def flag(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw not in TRUE + FALSE:
        raise UsageError(f"{name}={env[name]!r}: expected 1 or 0")
    return raw in TRUE


def positive(env: Mapping[str, str], name: str, default: float, unit: str = "seconds") -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UsageError(f"{name}={raw!r}: expected a number of {unit} above 0")
    return value


def port(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise UsageError(f"{name}={raw!r}: expected a TCP port, 1 to 65535")
    return int(raw)


@dataclass(frozen=True)
class Settings:
    broker_url: str | None = None
    password_file: Path | None = None
    visibility_timeout: int = VISIBILITY_DEFAULT
    broker_timeout: float = BROKER_TIMEOUT_DEFAULT
    broker_ca: Path | None = None
    broker_cert: Path | None = None
    broker_key: Path | None = None
    checkpoint: Location | None = None
    data_roots: tuple[Location, ...] = ()
    worker_name: str | None = None
    tf32: bool = False
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "vggish-pipeline")
    nvidia_smi_timeout: float = NVIDIA_SMI_TIMEOUT_DEFAULT
    allow_cpu_fallback: bool = False
    gpu_memory_limit: int | None = None  # MiB
    exit_when_idle: float | None = None  # seconds without a chunk before a worker leaves
    metrics_port: int | None = None  # where /metrics is served
    autoscale: str | None = None  # MIN:MAX workers for `worker up`
    scale_idle: float = SCALE_IDLE_DEFAULT

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        cache = env.get(CACHE_ENV) or Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vggish-pipeline"
        return cls(
            broker_url=env.get(BROKER_ENV) or None,
            password_file=Path(env[PASSWORD_FILE_ENV]) if env.get(PASSWORD_FILE_ENV) else None,
            visibility_timeout=round(positive(env, VISIBILITY_ENV, VISIBILITY_DEFAULT)),
            broker_timeout=positive(env, BROKER_TIMEOUT_ENV, BROKER_TIMEOUT_DEFAULT),
            broker_ca=Path(env[CA_ENV]) if env.get(CA_ENV) else None,
            broker_cert=Path(env[CERT_ENV]) if env.get(CERT_ENV) else None,
            broker_key=Path(env[KEY_ENV]) if env.get(KEY_ENV) else None,
            checkpoint=location(env[CHECKPOINT_ENV]) if env.get(CHECKPOINT_ENV) else None,
            data_roots=tuple(roots(env.get(DATA_ROOTS_ENV, ""))),
            worker_name=env.get(NAME_ENV) or None,
            tf32=flag(env, TF32_ENV),
            cache_dir=Path(cache),
            nvidia_smi_timeout=positive(env, NVIDIA_SMI_TIMEOUT_ENV, NVIDIA_SMI_TIMEOUT_DEFAULT),
            allow_cpu_fallback=flag(env, CPU_FALLBACK_ENV),
            gpu_memory_limit=round(positive(env, GPU_MEMORY_ENV, 0, unit="MiB")) or None,
            exit_when_idle=positive(env, EXIT_WHEN_IDLE_ENV, 0) or None,
            metrics_port=port(env, METRICS_ENV),
            autoscale=env.get(AUTOSCALE_ENV) or None,
            scale_idle=positive(env, SCALE_IDLE_ENV, SCALE_IDLE_DEFAULT),
        )


    def given(self, **values: Any) -> Settings:
        """These settings with the values a caller gave (a flag, an API argument) laid over their
        variables; None, False or an empty list leaves the variable's."""
        absent = [name for name, value in values.items() if value is None or value is False or value in ([], ())]
        return replace(self, **{name: value for name, value in values.items() if name not in absent})

    def with_flags(self, args: argparse.Namespace) -> Settings:
        """These settings with the flags a command was given (FLAGS) laid over them: the one place
        a flag meets its environment variable."""
        given = {name: getattr(args, dest, None) for name, dest in FLAGS.items()}
        if given["data_roots"]:
            given["data_roots"] = tuple(given["data_roots"])
        return self.given(**given)

    def tls_env(self) -> dict[str, str]:
        """The TLS files as environment, for worker processes started from here."""
        named = ((CA_ENV, self.broker_ca), (CERT_ENV, self.broker_cert), (KEY_ENV, self.broker_key))
        return {name: str(path) for name, path in named if path is not None}


def location_arg(text: str) -> Location:
    """A flag's path or URL (argparse's type=): a refused URL is a usage error."""
    try:
        return location(text)
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def add_tls_flags(parser: argparse.ArgumentParser) -> None:
    """--broker-ca/--broker-cert/--broker-key, for a command that takes --broker."""
    parser.add_argument("--broker-ca", type=Path, help=f"CA file for a rediss:// broker (env {CA_ENV}; default: the system's)")
    parser.add_argument("--broker-cert", type=Path, help=f"client certificate for a TLS broker that asks for one (env {CERT_ENV})")
    parser.add_argument("--broker-key", type=Path, help=f"the client certificate's key (env {KEY_ENV})")


def variables_help() -> str:
    """The environment variables, for the end of `--help`."""
    return "environment:\n" + "\n".join(f"  {name:<28} {what}" for name, what in VARIABLES.items())
