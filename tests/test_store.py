"""A job on an object store: inputs, checkpoint, job folder and outputs in a bucket of a real
S3-compatible server (moto's, credentials enforced), with real workers and TensorFlow."""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from conftest import cli
from outputs import check_outputs
from store import DENIED, Bucket

import vggish_pipeline
from vggish_pipeline.core.broker import make_app
from vggish_pipeline.core.job import Job
from vggish_pipeline.core.message import QUEUE, TASK_NAME
from vggish_pipeline.core.settings import Settings
from vggish_pipeline.core.store import location

CHUNK = 50


def stored_inputs(bucket, sample: dict, model_files: dict, prefix: str = "in") -> dict[str, str]:
    return {
        "spec": bucket.put(sample["spec"], f"{prefix}/wavfile_spec.dat"),
        "csv": bucket.put(sample["csv"], f"{prefix}/wavfile_df.csv"),
        "checkpoint": bucket.put(model_files["checkpoint"], "model/vggish_untrained.ckpt"),
        "pca": bucket.put(model_files["pca"], "model/vggish_untrained_pca_params.npz"),
    }


def fetched_outputs(bucket, job: str, into, pca: bool = True) -> None:
    into.mkdir(exist_ok=True)
    for name in ("wavfile_embed.dat", "wavfile_embed.csv", *(["wavfile_embed_pca.dat"] * pca)):
        bucket.get(f"{job}/{name}", into / name)


def run_on_store(urls: dict[str, str], out: str, tmp_path) -> dict:
    result = cli("producer", "run", urls["spec"], "--out", out, "--checkpoint", urls["checkpoint"], "--pca-params", urls["pca"],
                 "--chunk-rows", str(CHUNK), "--workers", "1", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_job_on_a_store_equals_the_reference_and_then_embeds_only_what_changed(bucket, sample, model_files, expected, tmp_path):
    """Everything in the bucket, nothing in a local folder; a grown input embeds only its new rows,
    a changed row only its chunk; each time the outputs equal the NumPy reference, one shard per chunk."""
    urls = stored_inputs(bucket, sample, model_files)
    out = f"{bucket.url}/jobs/a"
    work = tmp_path / "cwd"
    work.mkdir()
    summary = run_on_store(urls, out, work)
    assert (summary["enqueued_chunks"], summary["reused_rows"]) == (4, 0)
    assert summary["outputs"][0] == f"{out}/wavfile_embed.dat"
    fetched_outputs(bucket, "jobs/a", tmp_path / "got")
    check_outputs(tmp_path / "got", sample["csv"], expected["relu"], model_files["pca"])
    assert len(bucket.keys("jobs/a/shards")) == 4
    assert list(work.iterdir()) == []  # nothing written where the producer ran
    with vggish_pipeline.result(out) as got:  # the API's reader, from the bucket
        assert got.out_dir == location(out) and got.rows == 200
        np.testing.assert_array_equal(got.embeddings, np.fromfile(tmp_path / "got" / "wavfile_embed.dat").reshape(-1, 128))
        assert list(got.frame().columns[-2:]) == ["e126", "e127"]

    spec = np.fromfile(sample["spec"]).reshape(-1, 96, 64)
    grown = np.concatenate([spec, spec[:CHUNK]])
    lines = sample["csv"].read_text().splitlines(keepends=True)
    extra = [f"{200 + i}{line[line.index(','):]}" for i, line in enumerate(lines[1 : 1 + CHUNK])]
    sample["csv"].write_text("".join(lines + extra))
    grown.tofile(sample["spec"])
    bucket.put(sample["spec"], "in/wavfile_spec.dat")
    bucket.put(sample["csv"], "in/wavfile_df.csv")
    summary = run_on_store(urls, out, work)
    assert (summary["reused_rows"], summary["enqueued_rows"]) == (200, CHUNK)
    reference = np.concatenate([expected["relu"], expected["relu"][:CHUNK]])
    fetched_outputs(bucket, "jobs/a", tmp_path / "got")
    check_outputs(tmp_path / "got", sample["csv"], reference, model_files["pca"])

    grown[60] = spec[10]  # a row of the second chunk changed
    grown.tofile(sample["spec"])
    bucket.put(sample["spec"], "in/wavfile_spec.dat")
    summary = run_on_store(urls, out, work)
    assert (summary["enqueued_chunks"], summary["enqueued_rows"]) == (1, CHUNK)
    reference[60] = expected["relu"][10]
    fetched_outputs(bucket, "jobs/a", tmp_path / "got")
    check_outputs(tmp_path / "got", sample["csv"], reference, model_files["pca"])
    assert len(bucket.keys("jobs/a/shards")) == 5  # the changed chunk's old shard is gone


def test_a_worker_confined_to_a_prefix_refuses_messages_naming_anything_else(bucket, sample, model_files, workers, redis_url, expected, tmp_path):
    """A worker with --data-root s3://BUCKET/jobs runs the job there, and refuses forged chunks
    naming another bucket, a sibling prefix, a '..' path or a local folder: logged, never recorded
    against the job, which ends equal to the reference."""
    urls = stored_inputs(bucket, sample, model_files, prefix="jobs/in")
    other = Bucket({k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")})
    other.put(sample["spec"], "jobs/in/wavfile_spec.dat")
    workers.start("w", [location(f"{bucket.url}/jobs")])  # type: ignore[list-item]
    out = f"{bucket.url}/jobs/a"
    enqueued = cli("producer", "enqueue", urls["spec"], "--out", out, "--chunk-rows", "100", "--broker", redis_url,
                   "--checkpoint", urls["checkpoint"])
    assert enqueued.returncode == 0, enqueued.stderr
    job = Job.load(location(out))
    honest = job.message(job.chunks[0]).encode()
    forged = [
        {**honest, "source": f"{other.url}/jobs/in/wavfile_spec.dat"},
        {**honest, "out_dir": f"{bucket.url}/jobsX/a", "source": f"{bucket.url}/jobsX/in/wavfile_spec.dat"},
        {**honest, "out_dir": f"{bucket.url}/jobs/../a"},
        {**honest, "out_dir": str(tmp_path), "source": str(sample["spec"])},
    ]
    app = make_app(redis_url, Settings())
    for payload in forged:
        app.send_task(TASK_NAME, kwargs=payload, queue=QUEUE)
    waited = cli("producer", "wait", out, "--timeout", "300", "--broker", redis_url)
    assert waited.returncode == 0, waited.stderr
    finalized = cli("producer", "finalize", out, "--pca-params", urls["pca"])
    assert finalized.returncode == 0, finalized.stderr
    fetched_outputs(bucket, "jobs/a", tmp_path / "got")
    check_outputs(tmp_path / "got", sample["csv"], expected["relu"], model_files["pca"])
    log = workers.log("w")
    assert log.count("refused chunk:") == len(forged), log
    assert "outside the data roots" in log and "'..'" in log
    assert bucket.keys("jobs/a/failed") == [] and bucket.keys("jobsX") == []
    assert other.keys("jobs") == ["jobs/in/wavfile_spec.dat"]
    assert not (tmp_path / "shards").exists()
    assert "Traceback" not in log


def test_a_store_that_refuses_is_one_line_at_start_and_nothing_is_written(bucket, sample, model_files, s3_server, tmp_path):
    """A missing bucket, a denied prefix, wrong credentials, an unreachable endpoint, a missing
    input: for `producer run` and `worker start`, each one line and exit 3 before anything is
    written, and the secret is never printed. A worker only warns of a prefix it may not write
    (an input prefix may be read-only), and then stops on its broker (here none answers)."""
    from conftest import free_port

    urls = stored_inputs(bucket, sample, model_files)
    before = bucket.keys("")
    closed = f"http://127.0.0.1:{free_port()}"
    cases = {
        "no bucket": ({}, urls["spec"], "s3://no-such-bucket-here/job", "no such bucket"),
        "denied prefix": ({}, urls["spec"], f"{bucket.url}/{DENIED}/job", "access denied"),
        "wrong secret": ({"AWS_SECRET_ACCESS_KEY": "not-the-secret"}, urls["spec"], f"{bucket.url}/job", "access denied"),
        "unreachable": ({"AWS_ENDPOINT_URL": closed}, urls["spec"], f"{bucket.url}/job", closed.rsplit(":", 1)[1]),
        "no input": ({}, f"{bucket.url}/in/missing.dat", f"{bucket.url}/job", "no such file"),
    }
    runs = {(case, "producer"): ("producer", "run", spec, "--csv", urls["csv"], "--out", out, "--checkpoint", str(model_files["checkpoint"]),
                                 "--workers", "1") for case, (_, spec, out, _) in cases.items()}
    runs |= {(case, "worker"): ("worker", "start", "--cpu", "--broker", "redis://127.0.0.1:1/0", "--checkpoint", str(model_files["checkpoint"]),
                               "--data-root", out.rsplit("/", 1)[0]) for case, (_, _, out, _) in cases.items() if case != "no input"}
    with ThreadPoolExecutor(len(runs)) as pool:  # all at once: each is a process start and one refusal
        done = dict(zip(runs, pool.map(lambda key: cli(*runs[key], env=cases[key[0]][0], cwd=tmp_path, timeout=180), runs), strict=True))
    for (case, role), ran in done.items():
        said = ran.stdout + ran.stderr
        errors = [line for line in said.splitlines() if line.startswith(f"{role}: error:")]
        if (case, role) == ("denied prefix", "worker"):
            assert ran.returncode == 3 and "read-only for this worker" in said and "broker" in errors[0], said
            continue
        assert ran.returncode == 3 and len(errors) == 1 and cases[case][3] in errors[0].lower(), (case, role, said)
        assert "Traceback" not in said and s3_server["secret"] not in said, (case, role, said)
    assert bucket.keys("") == before  # no probe, job.json or shard left behind


def test_a_watch_keeps_its_job_folder_and_outputs_on_a_store(bucket, sample, model_files, weights, expected, tmp_path):
    """`watch --out s3://…` appends recordings to its local pair and publishes the outputs whole
    to the bucket at each refresh; they equal the NumPy reference, and a second look embeds only
    its new clips."""
    from reference import vggish
    from wavs import tone, write_wav

    from producer import audio

    out = f"{bucket.url}/jobs/w"
    inbox = tmp_path / "inbox"
    clips = []
    for look, count in enumerate((3, 2)):
        for i in range(count):
            clip = write_wav(tmp_path / "made" / f"c{look}{i}.wav", tone(1.0, 300 + 90 * len(clips)))
            clips.append(audio.file_examples(clip))
            inbox.mkdir(exist_ok=True)
            clip.rename(inbox / clip.name)
        watched = cli("producer", "watch", str(inbox), "--label", "tick", "--spec", str(sample["spec"]), "--out", out,
                      "--checkpoint", str(model_files["checkpoint"]), "--workers", "1", "--chunk-rows", "64", "--settle", "0", "--once")
        assert watched.returncode == 0, watched.stderr
        embedded, reused = (200 + count, 0) if look == 0 else (count, 200 + len(clips) - count)  # the job folder is new at the first look
        assert f"outputs refreshed: {200 + len(clips)} rows ({embedded} embedded, {reused} reused)" in watched.stderr, watched.stderr
    fetched_outputs(bucket, "jobs/w", tmp_path / "got", pca=False)
    check_outputs(tmp_path / "got", sample["csv"], np.concatenate([expected["relu"], vggish(weights, np.concatenate(clips), relu_embedding=True)]))


def test_a_shard_on_a_store_is_written_once_and_read_back_as_written(bucket):
    """Two workers' copies of one chunk: the store's conditional PUT keeps the first, whole."""
    from vggish_pipeline.core.shard import ShardMeta, read_shard, write_shard

    shards = location(f"{bucket.url}/jobs/a/shards")
    meta = ShardMeta(0, 3, "d" * 32, "relu", "model", "first", 1.0)
    first, second = np.arange(384, dtype=np.float32).reshape(3, 128), np.zeros((3, 128), np.float32)
    assert write_shard(shards, meta, first)
    assert not write_shard(shards, ShardMeta(0, 3, "d" * 32, "relu", "model", "second", 1.0), second)
    got_meta, got = read_shard(shards / meta.name)
    assert got_meta.worker == "first"
    np.testing.assert_array_equal(got, first)


def test_a_reader_of_a_stored_set_never_mixes_two_publications(bucket, tmp_path):
    """While a finalize publishes the outputs again and again, alternating between two versions of
    one chunk's embeddings (objects of the same sizes), every result() read is one whole set: its
    .dat is one version, and its CSV's e-columns are that .dat, bit for bit."""
    import threading

    import pandas as pd

    from producer.finalize import finalize
    from vggish_pipeline.core.job import Chunk, Job, JobDir
    from vggish_pipeline.core.shard import ShardMeta, write_shard

    rows = 300
    spec, frame = tmp_path / "wavfile_spec.dat", tmp_path / "wavfile_df.csv"
    np.zeros((rows, 96, 64)).tofile(spec)
    frame.write_text(",file_name,label,valid\n" + "".join(f"{i},c{i}.wav,yes,False\n" for i in range(rows)))
    out = location(f"{bucket.url}/jobs/r")
    JobDir(out).pin_model("stand-in")
    rng = np.random.default_rng(0)
    versions = [rng.standard_normal((rows, 128)).astype(np.float32) for _ in range(2)]
    for v, emb in enumerate(versions):  # one chunk, two shards of the same rows under two names
        write_shard(JobDir(out).shards, ShardMeta(0, rows, f"{v:032d}", "relu", "stand-in", "test", 1.0), emb)
    job = Job("r", str(out), str(spec), str(frame), rows, rows, "relu", [Chunk(0, rows, f"{0:032d}")])
    stop, failures = threading.Event(), []

    def publish() -> None:
        try:
            for i in range(1, 16):
                job.chunks[0] = Chunk(0, rows, f"{i % 2:032d}")
                job.save()
                finalize(job)
        except Exception as e:  # noqa: BLE001 - reported by the test
            failures.append(e)
        finally:
            stop.set()

    job.save()
    finalize(job)
    writer = threading.Thread(target=publish)
    writer.start()
    reads = 0
    while not stop.is_set():
        with vggish_pipeline.result(out) as got:
            dat = np.asarray(got.embeddings)
            assert any(np.array_equal(dat, v.astype(np.float64)) for v in versions)
            table = pd.read_csv(got.snapshot.csv(), index_col=0)
            np.testing.assert_array_equal(table[[f"e{i}" for i in range(128)]].to_numpy().view(np.int64), dat.view(np.int64))
            reads += 1
    writer.join()
    assert not failures and reads >= 3, (failures, reads)


def test_a_store_that_ignores_conditional_writes_is_named_at_start_and_the_job_still_equals_the_reference(
    sample, model_files, workers, redis_url, expected, tmp_path, monkeypatch
):
    """s3rver ignores If-None-Match: a worker whose data root is there says so at start (a probe
    written twice), then embeds the job, whose outputs equal the reference."""
    from conftest import free_port, unavailable
    from store import s3rver

    binary = os.environ.get("VGGISH_TEST_S3RVER") or shutil.which("s3rver")
    if binary is None:
        unavailable("no s3rver: `npm install --prefix .ci/node s3rver@3.7.1` (.ci/run does) and set VGGISH_TEST_S3RVER")
    with s3rver(binary, tmp_path / "s3rver", free_port()) as server:
        for name, value in server["env"].items():
            monkeypatch.setenv(name, value)
        bucket = Bucket(server["env"])
        urls = stored_inputs(bucket, sample, model_files, prefix="jobs/in")
        workers.start("w", [location(f"{bucket.url}/jobs")])
        assert "the store ignores conditional writes (If-None-Match)" in workers.log("w")
        out = f"{bucket.url}/jobs/a"
        for command in (("enqueue", urls["spec"], "--out", out, "--chunk-rows", "100", "--checkpoint", urls["checkpoint"]),
                        ("wait", out, "--timeout", "300"), ("finalize", out)):
            done = cli("producer", *command, "--broker", redis_url) if command[0] != "finalize" else cli("producer", *command)
            assert done.returncode == 0, done.stderr
        fetched_outputs(bucket, "jobs/a", tmp_path / "got", pca=False)
        check_outputs(tmp_path / "got", sample["csv"], expected["relu"])


def test_confinement_by_bucket_and_prefix_and_the_urls_refused_outright():
    """What a worker's data roots admit, by name: a bucket root admits its keys; a prefix admits
    its own keys, not a sibling's; a URL without a bucket, with '..' or fsspec's '::' chaining, or
    of a scheme no back end serves is refused before anything is asked of a store."""
    import pytest

    from vggish_pipeline.core.errors import InputError
    from vggish_pipeline.core.store import within

    bucket, prefix = location("s3://vggish"), location("s3://vggish/jobs")
    assert within(location("s3://vggish/jobs/a/job.json"), bucket) and within(location("s3://vggish/jobs/a"), prefix)
    assert within(prefix, prefix) and within(location("s3://vggish/jobs/"), prefix)
    for outside in ("s3://vggish/jobsX/a", "s3://vggish2/jobs/a", "s3://other/vggish/jobs", "memory://vggish/jobs/a"):
        assert not within(location(outside), prefix), outside
    assert not within(location("/vggish/jobs/a"), prefix) and not within(location("s3://vggish/jobs/a"), location("/vggish"))
    for refused in ("s3:///jobs/a", "s3://vggish/jobs/../x", "s3://vggish/./jobs", "s3://vggish/jobs/a::file:///etc", "nosuch://b/k"):
        with pytest.raises(InputError):
            location(refused)
