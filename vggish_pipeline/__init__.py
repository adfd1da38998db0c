"""vggish-pipeline's Python API, for notebooks and scripts:

    from vggish_pipeline import embed
    done = embed("wavfile_spec.dat", checkpoint="vggish_model.ckpt")
    done.embeddings        # N x 128 float64, memory-mapped from wavfile_embed.dat
    done.frame()           # the input columns, then e0..e127

    from vggish_pipeline import result
    with result("out/") as r:  # a job's outputs as one complete set, while a watch appends to them
        r.frame()

Its names load on first use, so that a worker importing the core (`vggish_pipeline.core`, which
both roles stand on) does not load the producer.
"""

from __future__ import annotations

from typing import Any

from vggish_pipeline.core import package_version
from vggish_pipeline.core.errors import (
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

API = ("embed", "add_clips", "status", "watch", "result", "Result", "Watch")

__all__ = [
    *API,
    "PipelineError", "UsageError", "InputError", "BrokerError", "CheckpointError", "JobFailed", "WorkersDied", "TimedOut",
    "WriteError", "__version__",
]


def __getattr__(name: str) -> Any:
    if name in API:
        from vggish_pipeline import api

        return getattr(api, name)
    if name == "__version__":
        return package_version()
    raise AttributeError(f"module 'vggish_pipeline' has no attribute {name!r}")
