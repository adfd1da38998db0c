"""VGGish in tf-slim under the official variable names, and the warm session a worker keeps."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from vggish_pipeline.errors import CheckpointError
from vggish_pipeline.spectrogram import BANDS, FRAMES
from worker import checkpoint
from worker.devices import load_tensorflow

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


def visible_device() -> str:
    """What TensorFlow will run on in this process: the first visible GPU's name, or 'CPU'."""
    tf = load_tensorflow()

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "CPU"
    details = tf.config.experimental.get_device_details(gpus[0])
    return f"GPU {details.get('device_name', gpus[0].name)}"


DEFAULT_BATCH = 512  # rows per session.run: larger runs are faster on the CPU too (BENCHMARKS.md)


class Embedder:
    """One VGGish graph and session, restored once and reused for every chunk a worker runs.

    The constructor checks the checkpoint and builds the graph; the weights then load on a helper
    thread (TensorFlow reads them without holding the GIL), so the caller can get on with its own
    start-up meanwhile. `loaded()` waits for them, and so does `embed`.
    """

    def __init__(
        self, checkpoint_path: Path, cache_dir: Path, threads: int = 0, batch_size: int = DEFAULT_BATCH, tf32: bool = False
    ) -> None:
        """`cache_dir` keeps the checkpoint's digest and its fast V2 copy between starts (Settings.cache_dir)."""
        helper = ThreadPoolExecutor(1, thread_name_prefix="vggish-load")
        try:
            # Hash the checkpoint on another core while TensorFlow imports: a worker starts 0.3 s sooner.
            digest = helper.submit(checkpoint.fingerprint, checkpoint_path, cache_dir)
            tf = load_tensorflow()
            # TensorFlow would use TF32 on Ampere and newer GPUs; float32 gives every device the same embeddings.
            tf.config.experimental.enable_tensor_float_32_execution(tf32)
            reader = checkpoint.check_variables(checkpoint_path)  # names and shapes, with a clear error
            self.fingerprint = checkpoint.model_id(digest.result(), tf32)
            saver = self._build(tf, threads)
            copy = checkpoint.fast_copy(checkpoint_path, digest.result(), cache_dir)
            self._weights = helper.submit(self._restore, saver, checkpoint_path, copy)
            if copy is not None:
                helper.submit(self._keep_copy, saver, copy)  # after the restore, while chunks run
        finally:
            helper.shutdown(wait=False)
        self.untrained = checkpoint.is_untrained(reader)
        self.batch_size = batch_size
        self.device = visible_device()

    def _build(self, tf, threads: int):
        """The graph and its session, without weights; returns the Saver that will load them."""
        tf1 = tf.compat.v1
        self._graph = tf.Graph()
        with self._graph.as_default():
            self._input, self._output = define_vggish(tf.float64)
            config = tf1.ConfigProto(intra_op_parallelism_threads=threads, inter_op_parallelism_threads=threads)
            config.gpu_options.allow_growth = True
            self._session = tf1.Session(graph=self._graph, config=config)
            saver = tf1.train.Saver(tf1.global_variables())  # reads V1 and V2; writes the V2 copy
        self._graph.finalize()  # any per-task graph growth is a bug: fail loudly
        return saver

    def _restore(self, saver, checkpoint_path: Path, copy: Path | None) -> Path:
        """Load the weights from this machine's V2 copy if it has one, else from the checkpoint;
        return where they came from."""
        started = time.perf_counter()
        source = copy if copy is not None and checkpoint.has_copy(copy) else checkpoint.checkpoint_prefix(checkpoint_path)
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
        # A full warm-up batch would cost a whole batch of compute to save ~0.1 s on the first one.
        self._session.run(self._output, {self._input: np.zeros((1, FRAMES, BANDS))})
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

    def embed(self, rows: np.ndarray, form: str) -> np.ndarray:
        """Embeddings (float32, n x 128) of n float64 spectrograms, in sub-batches of `batch_size`."""
        self.loaded()
        out = np.empty((len(rows), 128), dtype=np.float32)
        for i in range(0, len(rows), self.batch_size):
            batch = rows[i : i + self.batch_size]
            out[i : i + len(batch)] = self._session.run(self._output, {self._input: batch})
        if form == "relu":
            np.maximum(out, 0, out=out)
        return out

    def close(self) -> None:
        self._session.close()
