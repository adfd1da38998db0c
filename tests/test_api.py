"""The Python API's contract beyond the notebook: the project's own exceptions (never SystemExit),
and an interrupted call that leaves nothing running and keeps its shards."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from conftest import merged_env
from test_faults import alive, descendants, shards, wait_for

import vggish_pipeline as vp


def test_errors_are_the_projects_exceptions(sample, model_files, tmp_path, monkeypatch, machine):
    with pytest.raises(vp.InputError, match="no such file"):
        vp.embed(tmp_path / "missing.dat", checkpoint=model_files["checkpoint"])
    monkeypatch.delenv("VGGISH_CHECKPOINT", raising=False)
    with pytest.raises(vp.UsageError, match="no checkpoint"):
        vp.embed(sample["spec"])
    with pytest.raises(vp.InputError, match="not a job folder"):
        vp.status(sample["dir"])
    with pytest.raises(vp.InputError, match="no recordings found"):
        vp.add_clips(tmp_path, sample["spec"], label="x")
    monkeypatch.setenv("VGGISH_VISIBILITY_TIMEOUT", "soon")
    with pytest.raises(vp.UsageError, match="VGGISH_VISIBILITY_TIMEOUT"):
        vp.embed(sample["spec"], checkpoint=model_files["checkpoint"])
    assert issubclass(vp.WorkersDied, vp.JobFailed) and issubclass(vp.JobFailed, vp.PipelineError)


def test_an_interrupted_embed_stops_all_it_started_and_keeps_its_shards(sample, model_files, expected, machine):
    """As a notebook's interrupt button does: SIGINT (KeyboardInterrupt) in the middle of embed()."""
    from outputs import check_outputs

    code = (
        "import sys, vggish_pipeline as vp\n"
        "try:\n"
        "    vp.embed(sys.argv[1], checkpoint=sys.argv[2], chunk_rows=20, workers=1, progress=False)\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', flush=True)\n"
    )
    call = subprocess.Popen([sys.executable, "-c", code, str(sample["spec"]), str(model_files["checkpoint"])],
                            stdout=subprocess.PIPE, text=True, env=merged_env({"CUDA_VISIBLE_DEVICES": "-1"}))
    try:
        wait_for(lambda: len(shards(sample["dir"])) >= 2, what="two shards")
        started = descendants(call.pid)
        assert len(started) >= 2  # a Redis and a worker
        call.send_signal(signal.SIGINT)
        out, _ = call.communicate(timeout=120)
    finally:
        if call.poll() is None:
            call.kill()
            call.wait()
    assert out.strip() == "interrupted" and call.returncode == 0
    time.sleep(0.5)
    assert not any(alive(p) for p in started)
    kept = {p.name for p in shards(sample["dir"])}
    assert len(kept) >= 2
    result = vp.embed(sample["spec"], checkpoint=model_files["checkpoint"], progress=False)  # goes on from the shards
    assert result.summary.reused_chunks >= len(kept) and result.summary.enqueued_chunks == 10 - result.summary.reused_chunks
    check_outputs(sample["dir"], sample["csv"], expected["relu"])
