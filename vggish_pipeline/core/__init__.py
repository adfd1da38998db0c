"""The shared core: what the producer and the workers both speak, and what the API stands on.

The message (`message`), the shard format (`shard`), the job and its folder (`job`), spectrogram I/O
(`spectrogram`), files written whole and journaled appends (`files`), settings from the
environment (`settings`), the broker's Celery app (`broker`), PCA post-processing
(`postprocess`), the errors (`errors`), device discovery and pinning (`devices`), local worker
processes (`fleet`) and which model a job is pinned to (`identity`). It imports neither role
nor the API (pyproject.toml's import-linter contracts).
"""

from __future__ import annotations


def package_version() -> str:
    """The installed vggish-pipeline's version (both CLIs' --version, and __version__)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vggish-pipeline")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"
