"""Errors a user can cause. The command-line edge prints them as one line and exits with the
error's code; bugs keep their traceback.

Exit codes, the same for `producer` and `worker` (EXIT_CODES is their --help text):
0 done; 1 the job failed (chunks failed for good, workers kept dying, the job is not complete);
2 usage (a flag missing or out of range); 3 bad input or setup (a file, the checkpoint, the
broker, a GPU, the disk); 4 timed out (`wait --timeout`); 5 done, but recordings were skipped
(`add-clips --bad-files`: listed in the report); 130 interrupted (Ctrl-C, SIGTERM).
"""

import re

EXIT_CODES = """exit codes:
  0    done
  1    the job failed: chunks failed for good, workers kept dying, or it is not complete
  2    usage: a flag missing or out of range
  3    bad input or setup: a file, the checkpoint, the broker, a GPU, the disk
  4    timed out (wait --timeout)
  5    done, but recordings were skipped (add-clips --bad-files: listed in the report)
  130  interrupted (Ctrl-C or SIGTERM)"""


class PipelineError(Exception):
    """Base of every error that is the user's input or setup, not a bug."""

    exit_code = 3


class UsageError(PipelineError):
    """A flag is missing, or its value is out of range."""

    exit_code = 2


class InputError(PipelineError):
    """A spectrogram file, CSV, output folder or job folder is not usable."""


class WriteError(PipelineError):
    """A file could not be written: no space, a read-only or vanished folder, no permission."""


class CheckpointError(PipelineError):
    """A checkpoint or PCA-params file is missing, corrupt or not VGGish."""


class BrokerError(PipelineError):
    """The broker cannot be reached or is not configured."""


class StoreError(PipelineError):
    """An object store refused or could not be reached: no bucket, wrong credentials, a denied prefix, no answer."""


class DeviceError(PipelineError):
    """A GPU asked for is not one this process is granted."""


class JobFailed(PipelineError):
    """Chunks of a job failed for good, or the job is not complete."""

    exit_code = 1


class WorkersDied(JobFailed):
    """Local workers died, and could not be started again: exit 1 once the job had begun; exit 3
    (setup: a checkpoint, a GPU) when every one died before any was ready."""

    def __init__(self, message: str, at_start: bool = False) -> None:
        super().__init__(message)
        if at_start:
            self.exit_code = PipelineError.exit_code


class TimedOut(PipelineError):
    """A wait ran out of its time."""

    exit_code = 4


class ChunkRefused(PipelineError):
    """A chunk message this worker must not run: bad path, changed source, other model."""


SKIPPED = 5
INTERRUPTED = 130


def as_pipeline_error(e: Exception) -> PipelineError | None:
    """`e` as the project's error, one line: itself, an OS failure (no space, no permission…), or a
    broker client's error (an ACL refusal, a link lost for good); None for anything else (a bug)."""
    if isinstance(e, PipelineError):
        return e
    if isinstance(e, OSError):
        return PipelineError(os_error_line(e))
    return broker_failure(e) or store_failure(e)


def os_error_line(e: OSError) -> str:
    """An OS failure (no space, no permission, too many open files…) as one line naming the path."""
    where = ": ".join(str(f) for f in (e.filename, e.filename2) if f)
    return f"{where}: {e.strerror}" if where and e.strerror else (e.strerror or str(e))


def redact(url: str) -> str:
    """The URL with any password replaced, for logs and status output."""
    return re.sub(r"(//[^:/@]*:)[^@/]*@", r"\1***@", url)


STORE_CLIENTS = ("botocore", "aiobotocore", "s3fs", "fsspec", "aiohttp", "gcsfs", "adlfs")


def store_failure(e: Exception) -> StoreError | None:
    """An error raised by an object store's client (an endpoint out of reach, a refused request)
    as one line; None for any other. The clients never put a credential in their messages."""
    if type(e).__module__.split(".")[0] not in STORE_CLIENTS:
        return None
    return StoreError(f"object store: {type(e).__name__}: {redact(str(e).splitlines()[0]) if str(e) else ''}")


def broker_failure(e: Exception) -> BrokerError | None:
    """An error raised by the broker's client libraries (a command the ACL refuses, a link lost
    for good) as one BrokerError line; None for any other error."""
    if type(e).__module__.split(".")[0] not in ("redis", "kombu"):
        return None
    return BrokerError(f"broker: {type(e).__name__}: {redact(str(e))}")
