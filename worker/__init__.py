"""VGGish embedding worker: a Celery worker holding one warm VGGish session."""

