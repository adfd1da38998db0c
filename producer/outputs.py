"""A job's outputs: their names, what a finalize or refresh wrote, and reading them back.

`wavfile_embed.dat` (N x 128 float64), `wavfile_embed.csv` (the frame plus e0..e127), with PCA
params `wavfile_embed_pca.dat` (N x 128 uint8), with --parquet `wavfile_embed.parquet`, and
`wavfile_embed.manifest.json`, which says what they hold (see producer.finalize).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from vggish_pipeline.core.shard import EMBEDDING_SIZE

OUTPUT_DAT = "wavfile_embed.dat"
OUTPUT_CSV = "wavfile_embed.csv"
OUTPUT_PCA = "wavfile_embed_pca.dat"
OUTPUT_PARQUET = "wavfile_embed.parquet"
MANIFEST = "wavfile_embed.manifest.json"
EMBEDDING_COLUMNS = [f"e{i}" for i in range(EMBEDDING_SIZE)]


def output_paths(out: Path, pca: bool) -> list[Path]:
    """The files published together (the manifest aside): the .dat, the CSV and, with PCA, the uint8 .dat."""
    return [out / OUTPUT_DAT, out / OUTPUT_CSV] + ([out / OUTPUT_PCA] if pca else [])


@dataclass(frozen=True)
class Written:
    """What a finalize or a refresh did: the job's rows, the files now up to date, whether they
    grew in place (an append) or were written whole, and how long it took."""

    rows: int
    outputs: list[str] = field(default_factory=list)
    appended: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def embeddings(out: Path, rows: int) -> np.ndarray:
    """N x 128 float64, memory-mapped read-only from wavfile_embed.dat."""
    return np.memmap(out / OUTPUT_DAT, dtype="<f8", mode="r", shape=(rows, EMBEDDING_SIZE))


def pca_codes(out: Path, rows: int) -> np.ndarray | None:
    """N x 128 uint8 from wavfile_embed_pca.dat, if the job wrote one."""
    path = out / OUTPUT_PCA
    return np.memmap(path, dtype=np.uint8, mode="r", shape=(rows, EMBEDDING_SIZE)) if path.exists() else None
