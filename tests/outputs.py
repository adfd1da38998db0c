"""Checks on a finished job folder: every output equals the reference, in the seed's layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from reference import assert_close

E_COLUMNS = [f"e{i}" for i in range(128)]


def upstream_postprocess(embeddings: np.ndarray, pca_path: Path) -> np.ndarray:
    """The released-AudioSet recipe, written out here from its published description."""
    params = np.load(pca_path)
    pca = np.dot(params["pca_eigen_vectors"], embeddings.T - params["pca_means"].reshape(-1, 1)).T
    return ((np.clip(pca, -2.0, 2.0) + 2.0) * (255.0 / 4.0)).astype(np.uint8)


def check_outputs(out_dir: Path, frame_csv: Path, expected: np.ndarray, pca_path: Path | None = None) -> np.ndarray:
    dat = np.fromfile(out_dir / "wavfile_embed.dat").reshape(-1, 128)
    assert dat.shape == expected.shape
    assert_close(dat, expected)
    table = pd.read_csv(out_dir / "wavfile_embed.csv", index_col=0)
    frame = pd.read_csv(frame_csv, index_col=0)
    assert list(table.columns) == [*frame.columns, *E_COLUMNS]
    pd.testing.assert_frame_equal(table[frame.columns], frame)
    np.testing.assert_array_equal(table[E_COLUMNS].to_numpy().view(np.int64), dat.view(np.int64))  # bit for bit
    if pca_path is not None:
        quantized = np.fromfile(out_dir / "wavfile_embed_pca.dat", dtype=np.uint8).reshape(-1, 128)
        np.testing.assert_array_equal(quantized, upstream_postprocess(dat, pca_path))
        assert len(np.unique(quantized)) > 50  # not everything clipped to one value
    return dat
