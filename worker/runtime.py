"""The TensorFlow runtime in a worker: importing it quietly, the GPUs it sees, and why it sees none.

Import it only after the GPU pin (CUDA_VISIBLE_DEVICES) and the runtime environment
(vggish_pipeline.core.devices.runtime_env) are final: TensorFlow and CUDA read them once.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile


def load_tensorflow():
    """Import TensorFlow without the C++ start-up chatter it writes straight to fd 2.

    Import after CUDA_VISIBLE_DEVICES and the runtime environment (runtime_env) are final:
    TensorFlow and CUDA read them once. Nothing here creates a device: the first session does,
    with its own options (memory growth and limit, threads), which later callers could not change.
    """
    return tensorflow_gpus()[0]


def tensorflow_gpus():
    """(tensorflow, the GPUs it sees, what it wrote to fd 2 while importing and looking).

    Listing physical devices loads CUDA and the driver (cuInit, the dlopen of each library) but
    creates no device and no allocator. What TensorFlow said is kept: it is the only place that
    says why it sees no GPU (a missing library, an old driver), and it goes in the worker's error.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as said:
        try:
            os.dup2(said.fileno(), 2)
            import tensorflow

            gpus = tensorflow.config.list_physical_devices("GPU")
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        said.seek(0)
        text = said.read().decode(errors="replace")
    return tensorflow, gpus, text


TF_LOG_LINE = re.compile(r"^[IWEF]\d{4} [\d:.]+\s+\d+ [^\]]+\] (.*)$")
ABOUT_GPUS = re.compile(r"cuda|cudnn|gpu|driver|dlopen|lib\w+\.so|ptx|compute capability", re.IGNORECASE)


def no_gpu_reason(tf, said: str) -> str:
    """Why TensorFlow sees no GPU, in its own words: its errors, and what it said about CUDA and GPUs."""
    if not tf.test.is_built_with_cuda():
        return f"this TensorFlow {tf.__version__} is built without CUDA (install the gpu extra: pip install 'vggish-pipeline[gpu]')"
    reasons: list[str] = []
    for line in said.splitlines():
        m = TF_LOG_LINE.match(line.strip())
        text = (m[1] if m else line).strip()
        if text and (m and line[0] in "EF" or ABOUT_GPUS.search(text)) and text not in reasons:
            reasons.append(text)
    return "TensorFlow said: " + " | ".join(reasons) if reasons else "TensorFlow said nothing about it"
