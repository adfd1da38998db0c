"""Bad input: one line naming the problem, exit code 2, no traceback, no output files."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import cli

from vggish_pipeline.core.errors import ChunkRefused
from vggish_pipeline.core.settings import VARIABLES
from vggish_pipeline.core.spectrogram import ROW_BYTES


def outputs(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("wavfile_embed*"))


def assert_one_line_error(result, fragment: str, after_progress: bool = False, code: int = 3) -> None:
    """One line naming the problem, and the exit code of its kind (3: bad input or setup; 1: the job failed)."""
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and (after_progress or len(lines) == 1), result.stderr
    assert lines[-1].startswith("producer: error: ") and fragment in lines[-1], lines[-1]


def break_input(case: str, sample: dict, tmp_path: Path) -> list[str]:
    """Damage the sample as named; return the enqueue arguments that then must fail."""
    spec, frame = sample["spec"], sample["csv"]
    args = [str(spec)]
    if case == "ragged_dat":
        with open(spec, "ab") as f:
            f.write(b"\0" * 100)
    elif case == "empty_dat":
        spec.write_bytes(b"")
    elif case == "csv_rows":
        frame.write_text("\n".join(frame.read_text().splitlines()[:-3]) + "\n")
    elif case == "nan":
        data = np.fromfile(spec).reshape(-1, 96, 64)
        data[17, 3, 5] = np.nan
        data[150, 0, 0] = np.inf
        data.tofile(spec)
    elif case == "dat_is_dir":
        args = [str(sample["dir"] / "adir")]
        (sample["dir"] / "adir").mkdir()
    elif case == "out_is_file":
        (tmp_path / "afile").write_text("x")
        args += ["--out", str(tmp_path / "afile")]
    elif case == "no_csv":
        frame.unlink()
    return args


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("ragged_dat", "is not a multiple of one 96x64 float64 spectrogram"),
        ("empty_dat", "file is empty"),
        ("csv_rows", "has 197 rows but"),
        ("nan", "NaN or Inf in spectrogram rows 17, 150"),
        ("dat_is_dir", "is a directory"),
        ("out_is_file", "is a file, expected an output folder"),
        ("no_csv", "wavfile_df.csv: no such file"),
    ],
)
def test_enqueue_refuses_bad_input(case, fragment, sample, redis_url, tmp_path):
    args = break_input(case, sample, tmp_path)
    result = cli("producer", "enqueue", *args, "--broker", redis_url)
    assert_one_line_error(result, fragment)
    assert outputs(sample["dir"]) == []


def test_run_refuses_bad_checkpoint_and_pca_before_starting_anything(sample, model_files, tmp_path, machine):
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"garbage" * 1000)
    result = cli("producer", "run", str(sample["spec"]), "--checkpoint", str(corrupt))
    assert_one_line_error(result, "not a readable TensorFlow checkpoint")
    bad_pca = tmp_path / "pca.npz"
    np.savez(bad_pca, pca_eigen_vectors=np.eye(64), pca_means=np.zeros(128))
    result = cli(
        "producer", "run", str(sample["spec"]), "--checkpoint", str(model_files["checkpoint"]), "--pca-params", str(bad_pca)
    )
    assert_one_line_error(result, "pca_eigen_vectors has shape (64, 64), expected (128, 128)")
    assert outputs(sample["dir"]) == [] and not (sample["dir"] / "job.json").exists()


def test_worker_refuses_a_missing_checkpoint_at_start(redis_url, tmp_path):
    result = cli("worker", "start", "--broker", redis_url, "--checkpoint", str(tmp_path / "nope.ckpt"), "--cpu")
    assert result.returncode == 3 and result.stderr.strip().splitlines()[-1].startswith("worker: error: ")
    assert "no such checkpoint" in result.stderr and "Traceback" not in result.stderr


def test_unreadable_weights_stop_the_worker_before_it_takes_work(sample, redis_url, tmp_path, machine):
    """The index checks out but the data does not: the worker leaves with one line, `run` pins nothing."""
    from worker import checkpoint

    cut = checkpoint.write_untrained_checkpoint(tmp_path / "cut.ckpt", seed=0, v1=False)
    with open(next(tmp_path.glob("cut.ckpt.data-*")), "r+b") as f:
        f.truncate(1000)
    result = cli("worker", "start", "--broker", redis_url, "--checkpoint", str(cut), "--cpu", "--data-root", str(tmp_path))
    assert result.returncode == 3 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("worker: error: ") and "cannot restore VGGish" in result.stderr
    result = cli("producer", "run", str(sample["spec"]), "--checkpoint", str(cut))
    assert_one_line_error(result, "cannot restore VGGish")
    assert outputs(sample["dir"]) == [] and not (sample["dir"] / "job.json").exists()


def test_unreachable_broker_is_one_line(sample):
    result = cli("producer", "enqueue", str(sample["spec"]), "--broker", "redis://127.0.0.1:1/0")
    assert_one_line_error(result, "cannot reach broker redis://127.0.0.1:1/0")


def test_broker_password_never_printed(sample):
    result = cli("producer", "enqueue", str(sample["spec"]), "--broker", "redis://user:s3cret@127.0.0.1:1/0")
    assert "s3cret" not in result.stderr + result.stdout and "user:***@" in result.stderr


def test_finalize_refuses_an_incomplete_job_naming_rows(sample, redis_url):
    enqueued = cli("producer", "enqueue", str(sample["spec"]), "--broker", redis_url, "--chunk-rows", "50", "--json")
    assert enqueued.returncode == 0, enqueued.stderr
    result = cli("producer", "finalize", str(sample["dir"]))
    assert_one_line_error(result, "4 of 4 chunks have no shard yet (rows 0-50, 50-100, 100-150, 150-200)", code=1)
    assert outputs(sample["dir"]) == []


def test_source_changed_after_enqueue_is_refused_not_mixed(sample, redis_url, workers, model_files):
    assert cli("producer", "enqueue", str(sample["spec"]), "--broker", redis_url, "--chunk-rows", "100").returncode == 0
    data = np.fromfile(sample["spec"]).reshape(-1, 96, 64)
    data[120] += 1.0  # the previous step rewrote a row after enqueue
    data.tofile(sample["spec"])
    workers.start("w1", [sample["dir"]])
    waited = cli("producer", "wait", str(sample["dir"]), "--timeout", "120")
    assert_one_line_error(waited, "rows 100-200 (", after_progress=True, code=1)
    assert "changed since they were enqueued" in waited.stderr
    status = json.loads(cli("producer", "status", str(sample["dir"]), "--json").stdout)
    assert status["chunks_done"] == 1 and [f["start"] for f in status["failed"]] == [100]
    assert_one_line_error(cli("producer", "finalize", str(sample["dir"])), "1 chunks failed (rows 100-200", code=1)
    assert outputs(sample["dir"]) == []


def test_hostile_messages_are_refused_and_touch_nothing(sample, redis_url, workers, tmp_path):
    from vggish_pipeline.core.broker import make_app
    from vggish_pipeline.core.message import QUEUE, TASK_NAME
    from vggish_pipeline.core.settings import Settings

    enqueued = cli("producer", "enqueue", str(sample["spec"]), "--broker", redis_url, "--chunk-rows", "200", "--json")
    job = json.loads(enqueued.stdout)
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.dat"
    secret.write_bytes(b"\0" * ROW_BYTES)
    (sample["dir"] / "escape").symlink_to(outside)
    good = {"job": job["job"], "out_dir": job["out_dir"], "source": job["source"], "start": 0, "stop": 1,
            "digest": "0" * 32, "embedding": "relu"}
    hostile = [
        {**good, "source": str(secret)},  # outside the data root
        {**good, "source": str(sample["dir"] / ".." / "outside" / "secret.dat")},  # .. trick
        {**good, "source": str(sample["dir"] / "escape" / "secret.dat")},  # symlink out
        {**good, "out_dir": str(outside)},  # write outside
        {**good, "embedding": "sigmoid"},
        {"source": "/etc/passwd"},
    ]
    app = make_app(redis_url, Settings())
    for payload in hostile:
        app.send_task(TASK_NAME, kwargs=payload, queue=QUEUE)
    app.send_task(TASK_NAME, args=["/etc/passwd"], queue=QUEUE)
    workers.start("w1", [sample["dir"]])
    deadline = time.monotonic() + 60
    # The legitimate chunk (sent first) may still be in the model while the other thread refuses the rest.
    while (workers.log("w1").count("refused chunk") < len(hostile) + 1 or " embedded in " not in workers.log("w1")) \
            and time.monotonic() < deadline:
        time.sleep(0.5)
    log = workers.log("w1")
    assert log.count("refused chunk") == len(hostile) + 1, log
    assert log.count("refused chunk: path ") == 4  # the four path tricks, each refused before any I/O
    assert sorted(p.name for p in outside.iterdir()) == ["secret.dat"]
    shards = [p.name[:25] for p in (sample["dir"] / "shards").iterdir()]
    assert shards == ["000000000000-000000000200"]  # only the producer's own, legitimate chunk
    shutil.rmtree(outside)
    with pytest.raises(ChunkRefused):
        from worker.chunk import inside

        inside("/etc/passwd", [sample["dir"]])


def test_exit_codes_tell_usage_from_bad_input_and_are_in_the_help(sample):
    for tool in ("producer", "worker"):
        helped = cli(tool, "--help")
        assert helped.returncode == 0 and "exit codes:" in helped.stdout and "130  interrupted" in helped.stdout
    usage = cli("producer", "run", str(sample["spec"]), "--checkpoint", "x.ckpt", "--workers", "0")
    assert usage.returncode == 2 and usage.stderr.strip() == "producer: error: --workers must be at least 1"
    assert cli("producer", "run", str(sample["spec"]), env={"VGGISH_CHECKPOINT": None}).returncode == 2  # no checkpoint anywhere
    assert cli("producer", "finalize", str(sample["dir"])).returncode == 3  # not a job folder


@pytest.mark.parametrize(
    ("variable", "value"),
    [("VGGISH_VISIBILITY_TIMEOUT", "soon"), ("VGGISH_BROKER_TIMEOUT", "-5"), ("VGGISH_NVIDIA_SMI_TIMEOUT", "0"), ("VGGISH_TF32", "maybe")],
)
def test_a_bad_environment_value_is_one_line_naming_it(sample, variable, value):
    for command in (("producer", "status", str(sample["dir"])), ("worker", "ping", "w@x", "--broker", "redis://127.0.0.1:1/0")):
        refused = cli(*command, env={variable: value})
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.count("\n") == 1 and refused.stderr.startswith(f"{command[0]}: error: {variable}={value!r}")
    helped = cli("producer", "--help").stdout
    assert all(name in helped for name in VARIABLES)


def test_the_readme_lists_every_variable_as_settings_describes_it():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert all(f"| `{name}` | {what} |" in readme for name, what in VARIABLES.items())
