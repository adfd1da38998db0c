"""What the environment configures, read once at the edge (a CLI's main, an API call), checked,
and passed down: no other module reads these variables. A flag given on the command line wins
over its variable. A bad value is one line naming the variable, exit 2."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from vggish_pipeline.errors import UsageError

BROKER_ENV = "VGGISH_BROKER_URL"
PASSWORD_FILE_ENV = "VGGISH_BROKER_PASSWORD_FILE"
VISIBILITY_ENV = "VGGISH_VISIBILITY_TIMEOUT"
CHECKPOINT_ENV = "VGGISH_CHECKPOINT"
DATA_ROOTS_ENV = "VGGISH_DATA_ROOTS"
NAME_ENV = "VGGISH_WORKER_NAME"
TF32_ENV = "VGGISH_TF32"
CACHE_ENV = "VGGISH_CACHE_DIR"
NVIDIA_SMI_TIMEOUT_ENV = "VGGISH_NVIDIA_SMI_TIMEOUT"

# For `--help` and the README: every variable, what it sets, its default.
VARIABLES = {
    BROKER_ENV: "broker URL, redis://[user[:password]@]host:port/db or redis+socket://PATH (flag --broker)",
    PASSWORD_FILE_ENV: "a file holding the broker password (one line), put into a URL given without one",
    VISIBILITY_ENV: "seconds before Redis hands an unacknowledged chunk to another worker (default 3600)",
    CHECKPOINT_ENV: "VGGish checkpoint (flag --checkpoint)",
    DATA_ROOTS_ENV: "folders a worker may read and write, separated by ':' (flag --data-root; default: the current folder)",
    NAME_ENV: "a worker's name, e.g. gpu0@host (flag --name)",
    TF32_ENV: "1 lets workers compute in TF32 on Ampere and newer GPUs (flag --tf32; default 0)",
    CACHE_ENV: "what a machine keeps between starts: checkpoint digests and the fast V2 copy (default ~/.cache/vggish-pipeline)",
    NVIDIA_SMI_TIMEOUT_ENV: "seconds nvidia-smi may take before it counts as hung (default 15)",
}

TRUE, FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def positive(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UsageError(f"{name}={raw!r}: expected a number of seconds above 0")
    return value


@dataclass(frozen=True)
class Settings:
    broker_url: str | None = None
    password_file: Path | None = None
    visibility_timeout: int = 3600
    checkpoint: Path | None = None
    data_roots: tuple[Path, ...] = ()
    worker_name: str | None = None
    tf32: bool = False
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "vggish-pipeline")
    nvidia_smi_timeout: float = 15.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        tf32 = env.get(TF32_ENV, "").strip().lower()
        if tf32 not in TRUE + FALSE:
            raise UsageError(f"{TF32_ENV}={env[TF32_ENV]!r}: expected 1 or 0")
        cache = env.get(CACHE_ENV) or Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vggish-pipeline"
        return cls(
            broker_url=env.get(BROKER_ENV) or None,
            password_file=Path(env[PASSWORD_FILE_ENV]) if env.get(PASSWORD_FILE_ENV) else None,
            visibility_timeout=round(positive(env, VISIBILITY_ENV, 3600)),
            checkpoint=Path(env[CHECKPOINT_ENV]) if env.get(CHECKPOINT_ENV) else None,
            data_roots=tuple(Path(p) for p in env.get(DATA_ROOTS_ENV, "").split(os.pathsep) if p),
            worker_name=env.get(NAME_ENV) or None,
            tf32=tf32 in TRUE,
            cache_dir=Path(cache),
            nvidia_smi_timeout=positive(env, NVIDIA_SMI_TIMEOUT_ENV, 15.0),
        )


def variables_help() -> str:
    """The environment variables, for the end of `--help`."""
    return "environment:\n" + "\n".join(f"  {name:<28} {what}" for name, what in VARIABLES.items())
