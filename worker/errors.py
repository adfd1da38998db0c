"""Errors a user can cause. The command-line edge prints them as one line; bugs keep their traceback."""


class PipelineError(Exception):
    """Base of every error that is the user's input or setup, not a bug."""


class InputError(PipelineError):
    """A spectrogram file, CSV, output folder or job folder is not usable."""


class CheckpointError(PipelineError):
    """A checkpoint or PCA-params file is missing, corrupt or not VGGish."""


class BrokerError(PipelineError):
    """The broker cannot be reached or is not configured."""


class ChunkRefused(PipelineError):
    """A chunk message this worker must not run: bad path, changed source, other model."""


class DeviceError(PipelineError):
    """A GPU asked for is not one this process is granted."""
