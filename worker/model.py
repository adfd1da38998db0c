"""VGGish in tf-slim under the official variable names, and the warm session a worker keeps."""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from vggish_pipeline.core.errors import CheckpointError, DeviceError
from vggish_pipeline.core.identity import checkpoint_prefix, fingerprint, model_id
from vggish_pipeline.core.settings import CPU_FALLBACK_ENV
from vggish_pipeline.core.shard import EMBEDDING_SIZE
from vggish_pipeline.core.spectrogram import BANDS, FRAMES, aligned_empty
from worker import checkpoint
from worker.runtime import load_tensorflow, no_gpu_reason, tensorflow_gpus

log = logging.getLogger(__name__)


def define_vggish(input_dtype=None):
    """Build VGGish in the default graph; return (input placeholder, linear 128-d embedding).

    The 128-d layer is built linear, as upstream has it now; the older `relu` form that the
    seed notebook's outputs come from is the same tensor through a ReLU, applied per job.
    With `input_dtype` float64 the placeholder takes the spectrogram file's own values and
    casts them to float32 on the device (the same rounding as NumPy's), not on the worker's CPU.
    """
    tf = load_tensorflow()
    import tf_slim as slim

    tf1 = tf.compat.v1
    with slim.arg_scope(
        [slim.conv2d, slim.fully_connected],
        weights_initializer=tf1.truncated_normal_initializer(stddev=0.01),
        biases_initializer=tf1.zeros_initializer(),
        activation_fn=tf.nn.relu,
        trainable=False,
    ), slim.arg_scope([slim.conv2d], kernel_size=[3, 3], stride=1, padding="SAME"), slim.arg_scope(
        [slim.max_pool2d], kernel_size=[2, 2], stride=2, padding="SAME"
    ), tf1.variable_scope("vggish"):
        features = tf1.placeholder(input_dtype or tf.float32, shape=(None, FRAMES, BANDS), name="input_features")
        net = tf.reshape(tf.cast(features, tf.float32), [-1, FRAMES, BANDS, 1])
        net = slim.conv2d(net, 64, scope="conv1")
        net = slim.max_pool2d(net, scope="pool1")
        net = slim.conv2d(net, 128, scope="conv2")
        net = slim.max_pool2d(net, scope="pool2")
        net = slim.repeat(net, 2, slim.conv2d, 256, scope="conv3")
        net = slim.max_pool2d(net, scope="pool3")
        net = slim.repeat(net, 2, slim.conv2d, 512, scope="conv4")
        net = slim.max_pool2d(net, scope="pool4")
        net = slim.flatten(net)
        net = slim.repeat(net, 2, slim.fully_connected, 4096, scope="fc1")
        net = slim.fully_connected(net, 128, scope="fc2", activation_fn=None)
        return features, tf.identity(net, name="embedding")


def jit_note(tf, gpus: list) -> str | None:
    """A warning when this GPU has no kernels of its own in the TensorFlow wheel, only PTX that CUDA
    compiles at first use (Hopper on the official wheels: sm_60-sm_89 and compute_90): the first
    start then takes many minutes, once per CUDA cache."""
    if not gpus:
        return None
    major, minor = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability", (0, 0))
    built = tf.sysconfig.get_build_info().get("cuda_compute_capabilities", [])
    if f"sm_{major}{minor}" in built:
        return None
    return (f"this GPU (compute capability {major}.{minor}) has no kernels in TensorFlow's build ({', '.join(built)}): "
            "CUDA compiles them from PTX at first use: the first start on a machine can take many minutes, later ones read "
            f"them from CUDA_CACHE_PATH={os.environ.get('CUDA_CACHE_PATH', '~/.nv/ComputeCache')}")


def device_name(tf, gpus: list) -> str:
    """What TensorFlow will run on in this process: the first visible GPU's name, or 'CPU'."""
    if not gpus:
        return "CPU"
    details = tf.config.experimental.get_device_details(gpus[0])
    return f"GPU {details.get('device_name', gpus[0].name)}"


DEFAULT_BATCH = 512  # rows per session.run: larger runs are faster on the CPU too (BENCHMARKS.md)
GPU_THREADS = 2  # TensorFlow threads per pool on a GPU worker: the GPU computes, the CPU only feeds it (BENCHMARKS.md)
# CPU batches are padded to a multiple of CPU_MULTIPLE rows and to at least CPU_MIN_ROWS: oneDNN (TensorFlow
# 2.21, x86-64) gives a row the same bits in any such batch, at any position, but other bits below 128 rows
# or off a multiple of 16 (measured; tests/test_model.py checks it on every machine it runs on).
CPU_MULTIPLE = 16
CPU_MIN_ROWS = 128


class Embedder:
    """One VGGish graph and session, restored once and reused for every chunk a worker runs.

    The constructor checks the checkpoint and builds the graph; the weights then load on a helper
    thread (TensorFlow reads them without holding the GIL), so the caller can get on with its own
    start-up meanwhile. `loaded()` waits for them, and so does `embed`.
    """

    def __init__(
        self,
        checkpoint_path: Path,
        cache_dir: Path,
        threads: int = 0,
        batch_size: int = DEFAULT_BATCH,
        tf32: bool = False,
        gpu_memory_limit: int | None = None,
        require_gpu: str | None = None,
    ) -> None:
        """`cache_dir` keeps the checkpoint's digest and its fast V2 copy between starts (Settings.cache_dir);
        `threads` 0 means every core on the CPU and GPU_THREADS on a GPU; `gpu_memory_limit` is in MiB.
        With `require_gpu` (the device the process is pinned to), no GPU in TensorFlow's sight is a
        DeviceError carrying TensorFlow's own reason, raised before any weights are read."""
        helper = ThreadPoolExecutor(1, thread_name_prefix="vggish-load")
        try:
            # Hash the checkpoint on another core while TensorFlow imports: a worker starts 0.3 s sooner.
            digest = helper.submit(fingerprint, checkpoint_path, cache_dir)
            tf, gpus, said = tensorflow_gpus()
            self.device = device_name(tf, gpus)
            self.on_gpu = bool(gpus)
            self.no_gpu_reason = None if gpus else no_gpu_reason(tf, said)
            if require_gpu and not gpus:
                raise DeviceError(
                    f"pinned to {require_gpu}, but TensorFlow sees no GPU there: {self.no_gpu_reason}. "
                    f"Fix the CUDA libraries or driver, or set {CPU_FALLBACK_ENV}=1 to compute on the CPU (~100x slower)"
                )
            if note := jit_note(tf, gpus):
                log.warning("%s", note)
            # TensorFlow would use TF32 on Ampere and newer GPUs; float32 gives every device the same embeddings.
            tf.config.experimental.enable_tensor_float_32_execution(tf32)
            if self.on_gpu:  # a fixed algorithm per shape, so a row's bits do not depend on a timing race (cuDNN autotuning)
                tf.config.experimental.enable_op_determinism()
            reader = checkpoint.check_variables(checkpoint_path)  # names and shapes, with a clear error
            self.fingerprint = model_id(digest.result(), tf32)
            self.threads = threads or (GPU_THREADS if self.on_gpu else 0)
            self.memory_limit = gpu_memory_limit if self.on_gpu else None
            # Every batch has one of a few fixed shapes, so a row's embedding never depends on how it was
            # chunked: on a GPU each batch is padded to batch_size rows (cuDNN picks its algorithm per
            # shape), on the CPU as CPU_MULTIPLE and CPU_MIN_ROWS say (a 1-row clip costs 128 rows, not 512).
            self.multiple = batch_size if self.on_gpu else CPU_MULTIPLE
            self.batch_size = -(-batch_size // self.multiple) * self.multiple
            self.least = self.batch_size if self.on_gpu else min(CPU_MIN_ROWS, self.batch_size)
            saver = self._build(tf, self.threads)
            copy = checkpoint.fast_copy(checkpoint_path, digest.result(), cache_dir)
            self._weights = helper.submit(self._restore, saver, checkpoint_path, copy)
            if copy is not None:
                helper.submit(self._keep_copy, saver, copy)  # after the restore, while chunks run
        finally:
            helper.shutdown(wait=False)
        self.untrained = checkpoint.is_untrained(reader)

    def _build(self, tf, threads: int):
        """The graph and its session, without weights; returns the Saver that will load them."""
        tf1 = tf.compat.v1
        self._graph = tf.Graph()
        with self._graph.as_default():
            self._input, self._output = define_vggish(tf.float64)
            config = tf1.ConfigProto(intra_op_parallelism_threads=threads, inter_op_parallelism_threads=threads)
            config.gpu_options.allow_growth = True  # TF_FORCE_GPU_ALLOW_GROWTH (runtime_env) sets it for every device first
            if self.memory_limit:
                config.gpu_options.experimental.virtual_devices.add(memory_limit_mb=[float(self.memory_limit)])
            self._session = tf1.Session(graph=self._graph, config=config)
            saver = tf1.train.Saver(tf1.global_variables())  # reads V1 and V2; writes the V2 copy
        self._graph.finalize()  # any per-task graph growth is a bug: fail loudly
        return saver

    def _restore(self, saver, checkpoint_path: Path, copy: Path | None) -> Path:
        """Load the weights from this machine's V2 copy if it has one, else from the checkpoint;
        return where they came from."""
        started = time.perf_counter()
        source = copy if copy is not None and checkpoint.has_copy(copy) else checkpoint_prefix(checkpoint_path)
        with self._graph.as_default():  # a new thread would otherwise run eagerly
            try:
                saver.restore(self._session, str(source))
            except Exception as e:
                if source != copy:  # a checkpoint whose index reads but whose data does not
                    raise CheckpointError(f"{checkpoint_path}: cannot restore VGGish ({type(e).__name__})") from e
                log.warning("V2 copy %s of %s is unreadable (%s): reading the checkpoint", copy, checkpoint_path, type(e).__name__)
                checkpoint.remove_copy(copy)
                return self._restore(saver, checkpoint_path, None)
        log.info("weights restored from %s in %.2f s", source, time.perf_counter() - started)
        # One row sets up the executor (a graph or device problem shows here, before taking work).
        # On the CPU a full warm-up batch would cost a whole batch of compute to save ~0.1 s on the
        # first one; on a GPU it is cheap, and compiles the kernels of the one shape it will run.
        self._session.run(self._output, {self._input: np.zeros((self.batch_size if self.on_gpu else 1, FRAMES, BANDS))})
        return source

    def _keep_copy(self, saver, copy: Path) -> None:
        """Save the weights just read from a V1 checkpoint as this machine's V2 copy (once, ~1 s)."""
        if self._weights.exception() is not None or self._weights.result() == copy:
            return
        try:
            with checkpoint.writing_copy(copy) as tmp, self._graph.as_default():
                if tmp is not None:
                    saver.save(self._session, str(tmp), write_meta_graph=False, write_state=False)
                    log.info("kept a V2 copy of the weights in %s: later starts load in ~0.3 s", copy)
        except Exception as e:  # a full or read-only disk only costs the slow restore next time
            log.warning("could not keep a V2 copy of the weights in %s: %s", copy, e)

    def loaded(self) -> Path:
        """Block until the weights are in and return what they were read from (the checkpoint or
        this machine's V2 copy of it); CheckpointError if they cannot be read."""
        return self._weights.result()

    def padded_rows(self, count: int) -> int:
        """Rows an input of `count` rows has once its last batch is padded to a fixed shape."""
        full, rest = divmod(count, self.batch_size)
        return full * self.batch_size + (max(self.least, -(-rest // self.multiple) * self.multiple) if rest else 0)

    def prepare(self, rows: np.ndarray) -> np.ndarray:
        """`rows` as embed feeds them: 64-byte aligned, zeros up to padded_rows. A chunk's reader
        prepares its buffer so itself (RowReader.read), outside the model lock; this copies."""
        batch = aligned_empty(self.padded_rows(len(rows)))
        batch[: len(rows)] = rows
        batch[len(rows) :] = 0
        return batch

    def embed(self, rows: np.ndarray, form: str, count: int | None = None) -> np.ndarray:
        """Embeddings (float32, count x 128) of the first `count` (default: all) float64 spectrograms
        in `rows`, in batches of `batch_size`; rows past `count` are the padding `prepare` adds."""
        count = len(rows) if count is None else count
        if len(rows) != self.padded_rows(count) or rows.ctypes.data % 64:
            rows = self.prepare(rows[:count])
        self.loaded()
        out = np.empty((count, EMBEDDING_SIZE), dtype=np.float32)
        for i in range(0, count, self.batch_size):
            batch = rows[i : i + self.batch_size]
            out[i : i + self.batch_size] = self._session.run(self._output, {self._input: batch})[: count - i]
        if form == "relu":
            np.maximum(out, 0, out=out)
        return out

    def close(self) -> None:
        self._session.close()
