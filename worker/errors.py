"""Errors a user can cause. The command-line edge prints them as one line; bugs keep their traceback."""


class PipelineError(Exception):
    """Base of every error that is the user's input or setup, not a bug."""


class InputError(PipelineError):
    """A spectrogram file, CSV, output folder or job folder is not usable."""


class WriteError(PipelineError):
    """A file could not be written: no space, a read-only or vanished folder, no permission."""


class CheckpointError(PipelineError):
    """A checkpoint or PCA-params file is missing, corrupt or not VGGish."""


class BrokerError(PipelineError):
    """The broker cannot be reached or is not configured."""


class JobFailed(PipelineError):
    """Chunks of a job failed for good, or could not be brought to an end."""


class WorkersDied(PipelineError):
    """Local workers died, and could not be started again."""


class ChunkRefused(PipelineError):
    """A chunk message this worker must not run: bad path, changed source, other model."""


class DeviceError(PipelineError):
    """A GPU asked for is not one this process is granted."""


def os_error_line(e: OSError) -> str:
    """An OS failure (no space, no permission, too many open files…) as one line naming the path."""
    where = ": ".join(str(f) for f in (e.filename, e.filename2) if f)
    return f"{where}: {e.strerror}" if where and e.strerror else (e.strerror or str(e))
