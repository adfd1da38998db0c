"""The worker's feed: fingerprint schemes old jobs keep, and chunks in flight through the real model."""

from __future__ import annotations

import json

import numpy as np
from conftest import cli
from outputs import check_outputs
from test_faults import enqueue, finish, shards, status, wait_for
from test_scaling import grow

from producer.plan import default_chunk_rows
from vggish_pipeline.core.job import Job
from vggish_pipeline.core.message import ChunkMessage
from vggish_pipeline.core.spectrogram import DIGESTS, digest


def test_each_scheme_fingerprints_what_it_names():
    rows = np.random.default_rng(0).standard_normal((3, 96, 64))
    raw = memoryview(rows).cast("B")
    import hashlib

    import xxhash

    assert digest(rows, "blake2b-128") == hashlib.blake2b(raw, digest_size=16).hexdigest()
    assert digest(rows, "xxh3-128") == xxhash.xxh3_128_hexdigest(raw)
    changed = rows.copy()
    changed[2, 95, 63] = np.nextafter(changed[2, 95, 63], 0)  # the last bit of the last value
    assert all(digest(rows, s) != digest(changed, s) for s in DIGESTS)


def test_a_message_without_a_scheme_is_an_old_producers_blake2b():
    payload = {"job": "j", "out_dir": "/d", "source": "/d/s.dat", "start": 0, "stop": 5, "digest": "0" * 32, "embedding": "relu"}
    assert ChunkMessage.decode(payload).digest_scheme == "blake2b-128"
    assert ChunkMessage.decode({**payload, "digest_scheme": "xxh3-128"}).digest_scheme == "xxh3-128"


def test_a_job_planned_with_the_old_scheme_keeps_it_and_its_shards(sample, model_files, expected, machine):
    """A job.json from before schemes existed names none: its chunks are blake2b-128 digests."""
    from producer.plan import plan_job

    args = ["producer", "run", str(sample["spec"]), "--checkpoint", str(model_files["checkpoint"]), "--chunk-rows", "80", "--json"]
    job = plan_job(sample["spec"], sample["csv"], sample["dir"], chunk_rows=80).job
    record = json.loads(job.dir.job_file.read_text())
    record["chunks"] = [[c.start, c.stop, digest(np.fromfile(sample["spec"]).reshape(-1, 96, 64)[c.start : c.stop], "blake2b-128")]
                        for c in job.chunks]
    del record["digest_scheme"]
    job.dir.job_file.write_text(json.dumps(record))

    first = cli(*args)
    assert first.returncode == 0, first.stderr
    assert Job.load(sample["dir"]).digest_scheme == "blake2b-128"
    assert {p.name.split("-")[2] for p in shards(sample["dir"])} == {c[2] for c in record["chunks"]}  # verified, not re-planned
    check_outputs(sample["dir"], sample["csv"], expected["relu"])
    again = json.loads(cli(*args).stdout.strip().splitlines()[-1])
    assert again["reused_chunks"] == 3 and again["enqueued_chunks"] == 0


def test_new_jobs_use_the_fast_scheme(sample, redis_url):
    enqueue(sample, redis_url, 100)
    job = Job.load(sample["dir"])
    assert job.digest_scheme == "xxh3-128"
    rows = np.fromfile(sample["spec"]).reshape(-1, 96, 64)
    assert [c.digest for c in job.chunks] == [digest(rows[c.start : c.stop], "xxh3-128") for c in job.chunks]


def test_chunks_in_flight_give_the_reference_and_a_warm_stop_finishes_all_held(sample, workers, redis_url, expected):
    """Three chunks held at once by the real model: outputs equal the reference; `worker down`
    finishes the chunks the worker holds and takes no more, and no chunk is embedded twice."""
    grow(sample, 5)
    expected = {"relu": np.tile(expected["relu"], (5, 1))}
    enqueue(sample, redis_url, 50)  # 20 chunks
    workers.start("held", [sample["dir"]], "--chunks-in-flight", "3", "--batch-size", "5")
    wait_for(lambda: len(shards(sample["dir"])) >= 1, what="a first shard")
    assert cli("worker", "down", "held@test", "--broker", redis_url).returncode == 0
    assert workers.procs["held"].wait(180) == 0
    held = status(sample["dir"])["workers"]["held@test"]["chunks"]
    assert 1 <= held < 20
    workers.start("rest", [sample["dir"]], "--chunks-in-flight", "2")
    finish(sample, redis_url, expected)
    per_worker = status(sample["dir"])["workers"]
    assert per_worker["held@test"]["chunks"] == held and sum(w["chunks"] for w in per_worker.values()) == 20


def test_fast_workers_get_larger_chunks_and_cpu_workers_keep_theirs():
    assert default_chunk_rows(105_835, 1) == 1024
    assert default_chunk_rows(105_835, 1, rows_per_s=80_000) == 4096
    assert default_chunk_rows(105_835, 16, rows_per_s=80_000) == 827  # 8 chunks each still comes first
    assert default_chunk_rows(105_835, 1, rows_per_s=5_000) == 1024
