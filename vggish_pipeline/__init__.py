"""vggish-pipeline from Python (a notebook, a script): the same jobs as the `producer` CLI.

    from vggish_pipeline import embed
    result = embed("wavfile_spec.dat", checkpoint="vggish_model.ckpt")
    result.embeddings      # N x 128 float64, memory-mapped from wavfile_embed.dat
    result.frame()         # the input columns, then e0..e127
"""

from __future__ import annotations

from vggish_pipeline.api import Result, Watch, add_clips, embed, status, watch
from worker import package_version
from worker.errors import (
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

__all__ = [
    "embed", "add_clips", "status", "watch", "Result", "Watch",
    "PipelineError", "UsageError", "InputError", "BrokerError", "CheckpointError", "JobFailed", "WorkersDied", "TimedOut",
    "WriteError", "__version__",
]


__version__ = package_version()
