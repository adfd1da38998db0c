"""End to end, as a user runs it: `producer run`, and `producer enqueue` + workers + wait + finalize."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import cli
from outputs import check_outputs
from reference import assert_close

from worker.runtime import load_tensorflow


def seed_loop(checkpoint_path, spectrograms: np.ndarray) -> np.ndarray:
    """The seed notebook's way: one session, the whole array in memory, 20 batches, relu output."""
    from worker.model import define_vggish

    tf = load_tensorflow()
    tf1 = tf.compat.v1
    with tf.Graph().as_default() as graph, tf1.Session(graph=graph) as sess:
        define_vggish()
        tf1.train.Saver().restore(sess, str(checkpoint_path))
        features = graph.get_tensor_by_name("vggish/input_features:0")
        embedding = tf.nn.relu(graph.get_tensor_by_name("vggish/embedding:0"))
        return np.concatenate([sess.run(embedding, {features: b}) for b in np.array_split(spectrograms, 20)])


def test_run_with_two_workers_writes_all_three_outputs_equal_to_reference(sample, model_files, expected, machine):
    result = cli(
        "producer", "run", str(sample["spec"]), "--checkpoint", str(model_files["checkpoint"]),
        "--workers", "2", "--pca-params", str(model_files["pca"]), "--chunk-rows", "48", "--json",
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["rows"] == 200 and summary["chunks"] == 5 and summary["enqueued_chunks"] == 5
    assert "rows/s" in result.stderr and "ETA" in result.stderr  # progress was shown
    assert re.search(r"chunks 5/5  [12] workers? active", result.stderr)
    dat = check_outputs(sample["dir"], sample["csv"], expected["relu"], model_files["pca"])

    spectrograms = np.fromfile(sample["spec"]).reshape(-1, 96, 64)
    assert_close(dat, seed_loop(model_files["checkpoint"], spectrograms))

    status = json.loads(cli("producer", "status", str(sample["dir"]), "--json").stdout)
    assert status["rows_done"] == 200 and status["chunks_done"] == 5 and not status["failed"]
    assert sum(w["chunks"] for w in status["workers"].values()) == 5

    again = cli("producer", "run", str(sample["spec"]), "--checkpoint", str(model_files["checkpoint"]), "--json")
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    assert summary["reused_chunks"] == 5 and summary["enqueued_chunks"] == 0


def test_enqueue_to_running_workers_then_wait_and_finalize(sample, workers, redis_url, model_files, expected, tmp_path):
    env = {"VGGISH_BROKER_URL": redis_url}
    out = tmp_path / "job"
    out.mkdir()
    workers.start("w1", [sample["dir"], out])
    workers.start("w2", [sample["dir"], out])
    enqueued = cli("producer", "enqueue", str(sample["spec"]), "--out", str(out), "--embedding", "linear", "--json", env=env)
    assert enqueued.returncode == 0, enqueued.stderr
    summary = json.loads(enqueued.stdout)
    assert summary["enqueued_rows"] == 200 and summary["chunk_rows"] == 64  # 2 live workers: 200 rows -> 64-row chunks
    assert summary["model"] is None  # the producer had no checkpoint: the first worker pins the job

    waited = cli("producer", "wait", str(out), "--timeout", "300")
    assert waited.returncode == 0, waited.stderr
    assert cli("producer", "finalize", str(out)).returncode == 0
    check_outputs(out, sample["csv"], expected["linear"])

    status = json.loads(cli("producer", "status", str(out), "--json").stdout)
    assert set(status["workers"]) <= {"w1@test", "w2@test"}
    assert sum(w["rows"] for w in status["workers"].values()) == 200

    again = json.loads(cli("producer", "enqueue", str(sample["spec"]), "--out", str(out), "--embedding", "linear", "--json", env=env).stdout)
    assert again["reused_rows"] == 200 and again["enqueued_chunks"] == 0
    assert again["model"]  # pinned by the workers that embedded it


def test_appended_rows_embed_only_new_chunks(sample, model_files, expected, machine):
    from vggish_pipeline.core.spectrogram import ROW_BYTES

    data, lines = sample["spec"].read_bytes(), sample["csv"].read_text().splitlines(keepends=True)
    sample["spec"].write_bytes(data[: 150 * ROW_BYTES])
    sample["csv"].write_text("".join(lines[:151]))
    args = ["producer", "run", str(sample["spec"]), "--checkpoint", str(model_files["checkpoint"]), "--chunk-rows", "40", "--json"]
    first = cli(*args)
    assert first.returncode == 0, first.stderr
    sample["spec"].write_bytes(data)  # the previous step appended 50 rows
    sample["csv"].write_text("".join(lines))
    second = cli(*args)
    assert second.returncode == 0, second.stderr
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    assert summary["reused_rows"] == 150 and summary["enqueued_rows"] == 50  # new rows in chunks of their own
    job = json.loads((sample["dir"] / "job.json").read_text())
    assert [c[:2] for c in job["chunks"]] == [[0, 40], [40, 80], [80, 120], [120, 150], [150, 190], [190, 200]]
    check_outputs(sample["dir"], sample["csv"], expected["relu"])


def grow_in_two_steps(sample, model_files) -> tuple[list[str], dict[str, bytes]]:
    """Run on the first 150 rows (outputs with PCA), then append the last 50 rows to the inputs.
    Returns the run's arguments and the outputs the first run made."""
    from vggish_pipeline.core.spectrogram import ROW_BYTES

    data, lines = sample["spec"].read_bytes(), sample["csv"].read_text().splitlines(keepends=True)
    sample["spec"].write_bytes(data[: 150 * ROW_BYTES])
    sample["csv"].write_text("".join(lines[:151]))
    args = [
        "run", str(sample["spec"]), "--checkpoint", str(model_files["checkpoint"]), "--pca-params", str(model_files["pca"]),
        "--chunk-rows", "40", "--json",
    ]
    first = cli("producer", *args)
    assert first.returncode == 0, first.stderr
    outputs = {p.name: p.read_bytes() for p in sample["dir"].glob("wavfile_embed*")}
    assert len(outputs) == 4  # .dat, .csv, _pca.dat and the manifest
    sample["spec"].write_bytes(data)
    sample["csv"].write_text("".join(lines))
    return args, outputs


def test_a_grown_job_appends_to_its_outputs_in_place_equal_to_a_full_finalize(sample, model_files, expected, machine):
    args, before = grow_in_two_steps(sample, model_files)
    inodes = {p.name: p.stat().st_ino for p in sample["dir"].glob("wavfile_embed*.dat")}
    second = cli("producer", *args)
    assert second.returncode == 0, second.stderr
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    assert summary["appended"] and summary["enqueued_rows"] == 50
    assert {p.name: p.stat().st_ino for p in sample["dir"].glob("wavfile_embed*.dat")} == inodes  # in place, not rewritten
    for name in ("wavfile_embed.dat", "wavfile_embed.csv", "wavfile_embed_pca.dat"):
        assert (sample["dir"] / name).read_bytes().startswith(before[name])
    check_outputs(sample["dir"], sample["csv"], expected["relu"], model_files["pca"])

    appended = {p.name: p.read_bytes() for p in sample["dir"].glob("wavfile_embed*")}
    full = cli("producer", "finalize", str(sample["dir"]), "--pca-params", str(model_files["pca"]))
    assert full.returncode == 0, full.stderr
    assert {p.name: p.read_bytes() for p in sample["dir"].glob("wavfile_embed*")} == appended  # byte for byte


@pytest.mark.parametrize("dies", [False, True], ids=["write-refused", "killed-mid-append"])
def test_an_append_cut_short_leaves_the_old_outputs_and_a_rerun_finishes(sample, model_files, expected, dies, machine):
    """A real file-size limit (RLIMIT_FSIZE) stops the append a few rows into the .dat: refused
    (EFBIG, as Python sees it), or killed by SIGXFSZ with the .dat torn."""
    import resource

    args, before = grow_in_two_steps(sample, model_files)
    limit = len(before["wavfile_embed.dat"]) + 1000
    ignore = "signal.SIG_DFL" if dies else "signal.SIG_IGN"
    code = f"import signal, sys; signal.signal(signal.SIGXFSZ, {ignore}); from producer.cli import main; sys.exit(main(sys.argv[1:]))"
    cut = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
    )
    if dies:
        assert cut.returncode == -signal.SIGXFSZ, cut.stderr
        assert len((sample["dir"] / "wavfile_embed.dat").read_bytes()) > len(before["wavfile_embed.dat"])  # torn for now
        status = cli("producer", "status", str(sample["dir"]))  # a reader says so, and writes nothing
        assert status.returncode == 0 and "cut short" in status.stdout and (sample["dir"] / ".append-journal.json").exists()
        from producer.finalize import repair

        repair(sample["dir"])  # what the next writer on the folder does first
    else:
        assert cut.returncode == 3, cut.stderr
        assert "wavfile_embed.dat: File too large" in cut.stderr and "Traceback" not in cut.stderr
    assert {p.name: p.read_bytes() for p in sample["dir"].glob("wavfile_embed*")} == before
    assert not (sample["dir"] / ".append-journal.json").exists()

    again = cli("producer", *args)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1])["appended"]
    check_outputs(sample["dir"], sample["csv"], expected["relu"], model_files["pca"])


def test_parquet_output_reads_back_equal_to_the_csv_and_follows_a_grown_job(sample, model_files, expected, machine):
    import pandas as pd

    args, _ = grow_in_two_steps(sample, model_files)
    grown = cli("producer", *args, "--parquet")
    assert grown.returncode == 0, grown.stderr
    table = pd.read_parquet(sample["dir"] / "wavfile_embed.parquet")
    from_csv = pd.read_csv(sample["dir"] / "wavfile_embed.csv", index_col=0)
    pd.testing.assert_frame_equal(table, from_csv, check_dtype=False)  # a column of relu zeros reads back from text as int
    assert len(table) == 200
    np.testing.assert_array_equal(table[[f"e{i}" for i in range(128)]].to_numpy(), np.fromfile(sample["dir"] / "wavfile_embed.dat").reshape(-1, 128))
