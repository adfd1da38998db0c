"""VGGish embedding worker: a Celery worker holding one warm VGGish session."""


def package_version() -> str:
    """The installed vggish-pipeline's version (both CLIs' --version, and vggish_pipeline.__version__)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vggish-pipeline")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"
