"""vggish-pipeline's shared core, and its Python API.

The core is what the producer and the workers both speak: the message (`message`), the shard
format (`shard`), the job folder (`jobdir`), spectrogram I/O (`spectrogram`), files written
whole (`files`), the broker's Celery app (`broker`), PCA post-processing (`postprocess`) and the
errors (`errors`). `producer/` and `worker/` are the two roles on it.

The API (`api`), for notebooks and scripts:

    from vggish_pipeline import embed
    result = embed("wavfile_spec.dat", checkpoint="vggish_model.ckpt")
    result.embeddings      # N x 128 float64, memory-mapped from wavfile_embed.dat
    result.frame()         # the input columns, then e0..e127

Its names load on first use, so that a worker importing the core does not load the producer.
"""

from __future__ import annotations

from typing import Any

from vggish_pipeline.errors import (
    BrokerError,
    CheckpointError,
    InputError,
    JobFailed,
    PipelineError,
    TimedOut,
    UsageError,
    WorkersDied,
    WriteError,
)

API = ("embed", "add_clips", "status", "watch", "Result", "Watch")

__all__ = [
    *API,
    "PipelineError", "UsageError", "InputError", "BrokerError", "CheckpointError", "JobFailed", "WorkersDied", "TimedOut",
    "WriteError", "__version__",
]


def package_version() -> str:
    """The installed vggish-pipeline's version (both CLIs' --version, and __version__)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vggish-pipeline")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def __getattr__(name: str) -> Any:
    if name in API:
        from vggish_pipeline import api

        return getattr(api, name)
    if name == "__version__":
        return package_version()
    raise AttributeError(f"module 'vggish_pipeline' has no attribute {name!r}")
