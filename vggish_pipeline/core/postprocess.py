"""The released-AudioSet post-processing: PCA with whitening, clip to [-2, 2], quantize to uint8."""

from __future__ import annotations

import hashlib

import numpy as np

from vggish_pipeline.core import store
from vggish_pipeline.core.errors import CheckpointError
from vggish_pipeline.core.shard import EMBEDDING_SIZE

PCA_EIGEN_VECTORS = "pca_eigen_vectors"  # the names in the released vggish_pca_params.npz
PCA_MEANS = "pca_means"
QUANTIZE_MIN = -2.0
QUANTIZE_MAX = 2.0


class PCA:
    """PCA params in the official vggish_pca_params.npz layout."""

    def __init__(self, path: store.Location) -> None:
        if path.is_dir():
            raise CheckpointError(f"{path}: is a directory, expected vggish_pca_params.npz")
        try:
            with np.load(store.opened(path), allow_pickle=False) as params:
                self.matrix = params[PCA_EIGEN_VECTORS]
                self.means = params[PCA_MEANS].reshape(-1, 1)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no such PCA params file") from None
        except KeyError as e:
            raise CheckpointError(f"{path}: PCA params lack {e}") from e
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable .npz ({e})") from e
        if self.matrix.shape != (EMBEDDING_SIZE, EMBEDDING_SIZE):
            raise CheckpointError(f"{path}: {PCA_EIGEN_VECTORS} has shape {self.matrix.shape}, expected (128, 128)")
        if self.means.shape != (EMBEDDING_SIZE, 1):
            raise CheckpointError(f"{path}: {PCA_MEANS} has {self.means.size} values, expected 128")
        self.digest = hashlib.sha256(self.matrix.astype("<f8").tobytes() + self.means.astype("<f8").tobytes()).hexdigest()[:32]

    def quantize(self, embeddings: np.ndarray) -> np.ndarray:
        """uint8 embeddings exactly as upstream's Postprocessor makes them (truncating cast included)."""
        pca = np.dot(self.matrix, embeddings.T - self.means).T
        clipped = np.clip(pca, QUANTIZE_MIN, QUANTIZE_MAX)
        return ((clipped - QUANTIZE_MIN) * (255.0 / (QUANTIZE_MAX - QUANTIZE_MIN))).astype(np.uint8)
