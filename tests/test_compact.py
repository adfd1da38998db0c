"""Compaction: a watch's small chunks merged into chunks of the job's size, nothing embedded again,
the outputs byte for byte as they were, and a kill -9 at any moment losing nothing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from conftest import SAMPLE_ROWS, cli
from outputs import check_outputs
from reference import vggish
from test_clips import wait_for_log
from wavs import tone, write_wav

from producer import audio

OUTPUTS = ("wavfile_embed.dat", "wavfile_embed.csv")


def shards(out: Path) -> list[Path]:
    return sorted((out / "shards").glob("*.npz"))


def test_a_watch_compacts_its_refreshes_small_chunks_and_its_outputs_equal_the_reference(sample, workers, redis_url, weights, expected, tmp_path):
    """30 clips, one refresh each, with --compact-after 10: each refresh adds a one-row chunk,
    and every tenth the watch merges them; the outputs equal the NumPy reference throughout."""
    workers.start("w1", [sample["dir"]])
    inbox, log = tmp_path / "inbox", tmp_path / "watch.log"
    inbox.mkdir()
    args = [sys.executable, "-m", "producer", "watch", str(inbox), "--label", "tick", "--spec", str(sample["spec"]),
            "--broker", redis_url, "--chunk-rows", "64", "--settle", "0.2", "--poll", "0.1", "--compact-after", "10"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_for_log(proc, log, "outputs refreshed", 1)
        clips = []
        for i in range(30):
            clip = write_wav(tmp_path / "made" / f"c{i:02d}.wav", tone(1.0, 300 + 40 * i))
            clips.append(audio.file_examples(clip))
            clip.rename(inbox / clip.name)
            wait_for_log(proc, log, f"outputs refreshed: {SAMPLE_ROWS + i + 1} rows", 1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    text = log.read_text()
    assert text.count("compacted:") == 3 and "none embedded again" in text, text
    job = json.loads((sample["dir"] / "job.json").read_text())
    small = [c for c in job["chunks"] if c[1] - c[0] < 64]
    assert len(small) < 10 and len(shards(sample["dir"])) == len(job["chunks"])  # a handful; the merged ones are gone
    new = np.concatenate(clips)
    check_outputs(sample["dir"], sample["csv"], np.concatenate([expected["relu"], vggish(weights, new, relu_embedding=True)]))


def synthetic_job(directory: Path, rows: int, bounds: list[tuple[int, int]] | None = None) -> Path:
    """A job of one-row chunks, as a long watch leaves it: its shards made by the project's own
    shard writer from made-up embeddings (row i's are i + k/128), then its outputs by finalize.
    What is tested is the file protocol, not the model."""
    from producer.dataset import scan, write_sample
    from producer.finalize import finalize
    from vggish_pipeline.core.job import Job, JobDir
    from vggish_pipeline.core.shard import ShardMeta, write_shard
    from vggish_pipeline.core.spectrogram import NEW_DIGEST

    spec, frame = write_sample(directory, rows)
    jobdir = JobDir(directory)
    jobdir.ensure()
    model = jobdir.pin_model("0" * 32)
    bounds = bounds or [(s, s + 64) for s in range(0, 256, 64)] + [(i, i + 1) for i in range(256, rows)]  # 4 full chunks, then a row a refresh
    chunks = scan(spec, bounds, NEW_DIGEST)
    job = Job(Job.new_id(), str(directory), str(spec), str(frame), rows, 64, "relu", chunks, NEW_DIGEST)
    job.save()
    for c in chunks:
        embeddings = np.arange(c.start, c.stop)[:, None] + np.arange(128) / 128
        write_shard(jobdir.shards, ShardMeta(c.start, c.stop, c.digest, "relu", model, "made", 0.0), embeddings.astype(np.float32))
    finalize(job)
    return directory


def test_compact_merges_one_row_chunks_and_a_kill_9_at_any_moment_loses_nothing(tmp_path):
    from producer.finalize import refresh
    from vggish_pipeline.core.job import Job

    made = synthetic_job(tmp_path / "made", 1800)
    before = {name: (made / name).read_bytes() for name in OUTPUTS}
    small = 4 + 1544
    assert len(Job.load(made).chunks) == small
    moments = {  # when to kill it, by what its shard folder shows
        "reading": lambda n, t: t > 0.3,
        "merged shards written": lambda n, t: n > small,
        "small shards half removed": lambda n, t: n < small // 2,
    }
    for moment, now in moments.items():
        out = tmp_path / moment.replace(" ", "-")
        shutil.copytree(made, out)
        proc = subprocess.Popen([sys.executable, "-m", "producer", "compact", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        began = time.monotonic()
        while not now(len(os.listdir(out / "shards")), time.monotonic() - began):
            assert proc.poll() is None, f"compact ended before {moment}"
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        job = Job.load(out)  # whole at every moment: every chunk it names has its shard
        assert all(job.shard_path(c).exists() for c in job.chunks) and job.chunks[-1].stop == 1800, moment
        done = cli("producer", "compact", str(out), "--json")
        assert done.returncode == 0, done.stderr
        job = Job.load(out)
        assert [c.rows for c in job.chunks] == [64] * 28 + [8], moment  # 1,800 rows in chunks of the job's size
        assert len(shards(out)) == len(job.chunks), moment
        assert {name: (out / name).read_bytes() for name in OUTPUTS} == before, moment  # byte for byte
        assert refresh(job).appended  # the manifest names the merged chunks: the next refresh appends, rewrites nothing
        assert {name: (out / name).read_bytes() for name in OUTPUTS} == before
    again = cli("producer", "compact", str(out), "--json")
    assert json.loads(again.stdout)["merged_rows"] == 0  # nothing left to merge


def test_compact_re_cuts_the_short_tails_that_long_recordings_leave_between_full_chunks(tmp_path):
    """A recording longer than a chunk gives a full chunk and a short one each refresh: the short
    ones are never side by side, and are re-cut with the full ones after them."""
    from vggish_pipeline.core.job import Job

    sizes = [64, 56, 64, 56, 64, 56]
    edges = np.cumsum([0, *sizes])
    out = synthetic_job(tmp_path / "job", int(edges[-1]), list(zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True)))
    before = {name: (out / name).read_bytes() for name in OUTPUTS}
    done = cli("producer", "compact", str(out), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["merged_rows"] == 360 - 64
    assert [c.rows for c in Job.load(out).chunks] == [64, 64, 64, 64, 64, 40]
    assert {name: (out / name).read_bytes() for name in OUTPUTS} == before
    assert len(shards(out)) == 6


GROWER = """
import sys
import numpy as np
from pathlib import Path
from producer.dataset import Known, scan
from producer.finalize import finalize, refresh
from vggish_pipeline.core.job import Job
from vggish_pipeline.core.shard import ShardMeta, write_shard
out, appends = Path(sys.argv[1]), int(sys.argv[2])
job, known = Job.load(out), Known()
for k in range(appends):
    rows = job.rows
    with open(job.source, "ab") as f:
        np.full((1, 96, 64), float(k)).tofile(f)
    with open(job.csv, "a") as f:
        f.write(f"{rows},grown/c{rows}.wav,yes,False\\n")
    chunk = scan(Path(job.source), [(rows, rows + 1)], job.digest_scheme)[0]
    embeddings = (np.arange(rows, rows + 1)[:, None] + np.arange(128) / 128).astype(np.float32)
    write_shard(job.dir.shards, ShardMeta(rows, rows + 1, chunk.digest, "relu", job.dir.pinned_model(), "made", 0.0), embeddings)
    job.rows, job.chunks = rows + 1, [*job.chunks, chunk]
    job.save()
    finalize(job, known=known) if k % 20 == 19 else refresh(job, known=known)  # appends in place; every 20th a whole new set
"""


def test_a_reader_during_a_stream_of_appends_sees_only_complete_sets(tmp_path):
    """`vggish_pipeline.result` while another process grows the outputs 200 times (appends in
    place, and every 20th a whole new set): each read's rows are in the .dat, the CSV and the
    manifest alike, and they are the right rows. Made-up embeddings (row i's are i + k/128):
    what is tested is the file protocol, not the model."""
    import vggish_pipeline

    out = synthetic_job(tmp_path / "job", 300)
    grower = subprocess.Popen([sys.executable, "-c", GROWER, str(out), "200"], stderr=subprocess.PIPE)
    seen = set()
    try:
        while grower.poll() is None or not seen:
            with vggish_pipeline.result(out) as r:
                embeddings, frame = np.asarray(r.embeddings), r.frame()
                assert len(embeddings) == len(frame) == r.rows
                assert frame.index.tolist() == list(range(r.rows))
                np.testing.assert_array_equal(embeddings[:, 0], np.arange(r.rows, dtype=np.float64))
                np.testing.assert_array_equal(frame["e1"].to_numpy(), np.arange(r.rows) + 1 / 128)
                seen.add(r.rows)
    finally:
        grower.wait(120)
    assert grower.returncode == 0, grower.stderr.read().decode()
    assert len(seen) >= 20, sorted(seen)  # it read while the outputs grew, many times
    assert vggish_pipeline.status(out).outputs_rows == 500


def test_a_csv_edited_under_a_watch_is_read_again_not_trusted(tmp_path):
    """The pair's one writer keeps the CSV's digest (dataset.Known) so that a refresh reads only what
    it appended; an edit by anything else (the lock is on the .dat) must send it back to reading all."""
    import pandas as pd
    import xxhash

    from producer.dataset import Known, scan
    from producer.finalize import refresh
    from vggish_pipeline.core.job import Job
    from vggish_pipeline.core.shard import ShardMeta, write_shard

    out = synthetic_job(tmp_path / "job", 300)
    job, known = Job.load(out), Known()
    assert refresh(job, known=known).appended and known.csv_hash is not None  # it knows the CSV now
    csv = Path(job.csv)
    text = csv.read_text().splitlines(keepends=True)
    text[1] = text[1].replace(text[1].split(",")[2], "edited-label-longer-than-before")  # row 0's label, edited in place
    csv.write_text("".join(text))
    with open(job.source, "ab") as f:  # and one row more, as a watch adds it
        np.zeros((1, 96, 64)).tofile(f)
    with open(csv, "a") as f:
        f.write("300,grown/c300.wav,yes,False\n")
    chunk = scan(Path(job.source), [(300, 301)], job.digest_scheme)[0]
    write_shard(job.dir.shards, ShardMeta(300, 301, chunk.digest, "relu", job.dir.pinned_model(), "made", 0.0),
                (300 + np.arange(128) / 128)[None].astype(np.float32))
    job.rows, job.chunks = 301, [*job.chunks, chunk]
    job.save()
    refresh(job, known=known)
    table, frame = pd.read_csv(out / "wavfile_embed.csv", index_col=0), pd.read_csv(csv, index_col=0)
    pd.testing.assert_frame_equal(table[frame.columns], frame)  # the edit is in the outputs, every row in place
    manifest = json.loads((out / "wavfile_embed.manifest.json").read_text())
    assert manifest["csv_digest"] == xxhash.xxh3_128(csv.read_bytes()).hexdigest()  # the digest of the CSV as it is
