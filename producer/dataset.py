"""The user's input pair: the spectrogram .dat and the CSV frame with one row per spectrogram."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import xxhash

from vggish_pipeline.core.errors import InputError
from vggish_pipeline.core.job import Chunk
from vggish_pipeline.core.spectrogram import NEW_DIGEST, RowReader, digest, first_bad_rows, row_count
from vggish_pipeline.core.store import Location


def csv_header(path: Location) -> list[str]:
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected a CSV file")
    with path.open(newline="") as f:
        try:
            header = next(csv.reader(f), None)
        except (csv.Error, UnicodeDecodeError) as e:
            raise InputError(f"{path}: not a readable CSV ({e})") from e
    if not header:
        raise InputError(f"{path}: CSV is empty (no header row)")
    return header


def index_column(header: list[str]) -> int | None:
    """0 when a CSV's first column is unnamed (an index pandas wrote, read back with index_col=0), else None."""
    return 0 if header[0] == "" else None


def csv_reader(
    source: Location | IO[bytes], block_size: int = 1 << 22, header: list[str] | None = None, skip_header: bool = True
) -> pacsv.CSVStreamingReader:
    """Stream the CSV with every column read as text, so its values are copied, never reinterpreted.
    `source` may be a file's lines after its header (`header` given, `skip_header=False`)."""
    names = [f"_{i}" for i in range(len(header or csv_header(source)))]  # type: ignore[arg-type]
    try:
        return pacsv.open_csv(
            source if isinstance(source, Path) or hasattr(source, "read") else source.open("rb"),  # a stored CSV: one stream
            read_options=pacsv.ReadOptions(column_names=names, skip_rows=1 if skip_header else 0, block_size=block_size),
            convert_options=pacsv.ConvertOptions(
                column_types={n: pa.string() for n in names}, strings_can_be_null=False, quoted_strings_can_be_null=False
            ),
        )
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"{source}: not a readable CSV ({str(e).splitlines()[0]})") from e


def csv_rows(path: Location) -> int:
    rows = 0
    try:
        for batch in csv_reader(path):
            rows += batch.num_rows
    except pa.ArrowInvalid as e:
        raise InputError(f"{path}: not a readable CSV ({str(e).splitlines()[0]})") from e
    return rows


def journal_path(spec: Path) -> Path:
    """Where `producer add-clips` notes both files' sizes while it appends (see producer.clips)."""
    return spec.with_name(f".{spec.name}.append-journal")


@dataclass
class Known:
    """What the one writer of a pair (a watch, holding its lock) knows of it without reading it again:
    its rows, and the running xxh3-128 of the CSV's first `csv_bytes` bytes. Trusted only while the
    CSV is as this writer left it (inode, size and mtime as it noted them after its own last write:
    an edit by anything else, which the lock on the .dat does not stop, makes it read everything
    again). A fresh Known knows nothing, and everything is read."""

    rows: int | None = None
    csv_bytes: int = 0
    csv_hash: Any = None  # xxhash.xxh3_128, or None before the CSV was first read
    csv_stat: tuple[int, int, int] | None = None  # the CSV as last seen: (inode, size, mtime ns)

    def as_left(self, csv_path: Location) -> bool:
        """The CSV is as this writer last saw it."""
        return self.csv_stat is not None and self.csv_stat == stat_key(csv_path)

    def wrote(self, csv_path: Location) -> None:
        """Note the CSV as this writer's own append left it."""
        self.csv_stat = stat_key(csv_path)

    def csv_digest(self, csv_path: Location, size: int | None = None) -> tuple[int, Any]:
        """The CSV's first `size` bytes (default: all): their count and xxh3-128, reading only the
        bytes past those known (all of them when the known ones are more than `size`, or the CSV
        is not as this writer left it)."""
        done, h = 0, xxhash.xxh3_128()
        if self.csv_hash is not None and (size is None or self.csv_bytes <= size) and self.as_left(csv_path):
            done, h = self.csv_bytes, self.csv_hash.copy()
        with csv_path.open("rb") as f:
            f.seek(done)
            while size is None or done < size:
                block = f.read(min(1 << 22, size - done) if size is not None else 1 << 22)
                if not block:
                    break
                h.update(block)
                done += len(block)
        return done, h

    def remember(self, csv_path: Location, csv_bytes: int, csv_hash: Any) -> None:
        self.csv_bytes, self.csv_hash = csv_bytes, csv_hash.copy()
        self.wrote(csv_path)


def stat_key(path: Location) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_size, getattr(st, "st_mtime_ns", int(st.st_mtime * 1e9))


def validate(spec: Location, csv_path: Location, known: Known | None = None) -> int:
    """Row count of a matching .dat/CSV pair, or an InputError naming what does not match. With
    `known` rows, only the .dat's size is checked against them (the CSV is not read again)."""
    if isinstance(spec, Path) and journal_path(spec).exists():  # add-clips appends only to a local pair
        raise InputError(
            f"{spec}: an add-clips is appending to it, or was cut off mid-append; if none runs, "
            f"`producer add-clips --spec {spec} --csv {csv_path}` with no files rolls it back"
        )
    rows = row_count(spec)
    if known is not None and known.rows is not None and known.as_left(csv_path):
        if rows != known.rows:
            raise InputError(f"{spec} has {rows} rows, not the {known.rows} this watch wrote: something else changed it")
        return rows
    header = csv_header(csv_path)
    if any(name.startswith("e") and name[1:].isdigit() for name in header):
        raise InputError(f"{csv_path}: already has embedding columns (e0...); give the input frame, not an output")
    n = csv_rows(csv_path)
    if n != rows:
        raise InputError(f"{csv_path} has {n} rows but {spec} has {rows} spectrograms; they must match one to one")
    if known is not None:
        known.rows = rows
    return rows


def scan(
    spec: Location, bounds: list[tuple[int, int]], scheme: str = NEW_DIGEST, known: dict[tuple[int, int], str] | None = None
) -> list[Chunk]:
    """Fingerprint the chunks with these (start, stop) bounds, and refuse NaN or Inf.

    `known` maps (start, stop) to a digest taken earlier of rows the caller knows are unchanged;
    those chunks are not read again.
    """
    chunks: list[Chunk] = []
    bad: list[int] = []
    reader = RowReader()
    for start, stop in bounds:
        if known and (start, stop) in known:
            chunks.append(Chunk(start, stop, known[(start, stop)]))
            continue
        data = reader.read(spec, start, stop)
        bad += first_bad_rows(data, start, limit=5 - len(bad)) if len(bad) < 5 else []
        chunks.append(Chunk(start, stop, digest(data, scheme)))
    if bad:
        raise InputError(f"{spec}: NaN or Inf in spectrogram rows {', '.join(map(str, bad))} (first {len(bad)} shown)")
    return chunks


def write_sample(out_dir: Path, rows: int, seed: int = 0) -> tuple[Path, Path]:
    """Synthetic log-mel-like spectrograms and a matching frame, in the seed notebook's layout."""
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec, csv_path = out_dir / "wavfile_spec.dat", out_dir / "wavfile_df.csv"
    labels = ["yes", "no", "up", "down", "left", "right", "on", "off"]
    with open(spec, "wb") as f:
        for start in range(0, rows, 1024):
            n = min(1024, rows - start)
            bands = np.linspace(0.0, -3.0, 64)
            tone = rng.integers(0, 64, size=(n, 1, 1))
            data = bands + 2.0 * np.exp(-0.5 * ((np.arange(64) - tone) / 3.0) ** 2) + rng.normal(0, 0.5, (n, 96, 64))
            data.astype("<f8").tofile(f)
    label = rng.integers(0, len(labels), rows)
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["", "file_name", "label", "valid"])
        for i in range(rows):
            w.writerow([i, f"{labels[label[i]]}/clip_{i // 2:06d}.wav", labels[label[i]], bool(rng.random() < 0.2)])
    return spec, csv_path
