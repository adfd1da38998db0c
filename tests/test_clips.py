"""Adding recordings: `producer add-clips` keeps the .dat and the CSV in step, and `producer watch` embeds new files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import SAMPLE_ROWS, cli, merged_env
from outputs import check_outputs
from reference import upstream_examples, vggish
from wavs import speech_like, tone, wav_bytes, write_audio, write_wav

from producer import audio
from vggish_pipeline.core.spectrogram import ROW_BYTES


def add_clips(sample: dict, *args: str) -> subprocess.CompletedProcess:
    return cli("producer", "add-clips", *args, "--spec", str(sample["spec"]), "--json")


def test_add_clips_appends_rows_and_frame_lines_in_step(sample, tmp_path):
    before = sample["spec"].read_bytes()
    yes = write_wav(tmp_path / "rec" / "yes" / "a.wav", tone(1.0, 500))
    up = write_wav(tmp_path / "rec" / "up" / "b.wav", tone(3.2, 2000, rate=44100), 44100, bits=24, channels=2)
    result = add_clips(sample, str(tmp_path / "rec"), "--label-from-folder", "--valid")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["files_added"] == 2 and summary["rows_added"] == 4 and summary["rows"] == SAMPLE_ROWS + 4
    assert "a.wav: 1 row" in result.stderr and "b.wav: 3 rows" in result.stderr

    data = sample["spec"].read_bytes()
    assert data[: len(before)] == before  # old rows untouched
    new = np.frombuffer(data[len(before) :], dtype="<f8").reshape(-1, 96, 64)
    np.testing.assert_array_equal(new, np.concatenate([audio.file_examples(up), audio.file_examples(yes)]))

    frame = pd.read_csv(sample["csv"], index_col=0)
    assert list(frame.index) == list(range(SAMPLE_ROWS + 4))  # the unnamed index column counts on
    tail = frame.iloc[SAMPLE_ROWS:]
    assert list(tail["label"]) == ["up", "up", "up", "yes"] and tail["valid"].tolist() == [True] * 4
    assert tail["file_name"].str.endswith(("up/b.wav", "yes/a.wav")).all()

    again = add_clips(sample, str(tmp_path / "rec"), "--label-from-folder")
    assert again.returncode == 0 and json.loads(again.stdout)["files_skipped"] == 2  # a re-run adds nothing twice
    assert sample["spec"].read_bytes() == data


def test_a_bad_file_refuses_the_whole_add_and_changes_nothing(sample, tmp_path):
    before = sample["spec"].read_bytes(), sample["csv"].read_bytes()
    write_wav(tmp_path / "good.wav", tone(2.0))
    write_wav(tmp_path / "short.wav", tone(0.5))
    (tmp_path / "broken.wav").write_bytes(b"RIFF....WAVEjunk")
    result = add_clips(sample, str(tmp_path / "good.wav"), str(tmp_path / "short.wav"), str(tmp_path / "broken.wav"), "--label", "x")
    assert result.returncode == 3
    assert "short.wav: too short (0.500 s)" in result.stderr and "broken.wav: " in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "producer: error: 2 of 3 files refused (listed above); nothing was added (--bad-files REPORT adds the rest and lists these)"
    assert "Traceback" not in result.stderr
    assert (sample["spec"].read_bytes(), sample["csv"].read_bytes()) == before
    assert sorted(p.name for p in sample["dir"].iterdir()) == ["wavfile_df.csv", "wavfile_spec.dat"]  # no temp left

    padded = add_clips(sample, str(tmp_path / "short.wav"), "--label", "x", "--pad")
    assert padded.returncode == 0 and json.loads(padded.stdout)["rows_added"] == 1


def test_a_new_pair_is_created_and_a_failed_first_add_leaves_none(tmp_path):
    spec = tmp_path / "new" / "clips.dat"
    frame = tmp_path / "new" / "clips.csv"
    write_wav(tmp_path / "short.wav", tone(0.2))
    failed = cli("producer", "add-clips", str(tmp_path / "short.wav"), "--label", "a", "--spec", str(spec), "--csv", str(frame))
    assert failed.returncode == 3 and not spec.exists() and not frame.exists()
    write_wav(tmp_path / "ok.wav", tone(1.0))
    ok = cli("producer", "add-clips", str(tmp_path / "ok.wav"), "--label", "a", "--spec", str(spec), "--csv", str(frame))
    assert ok.returncode == 0, ok.stderr
    ok_name = (tmp_path / "ok.wav").resolve().as_posix()  # outside the CSV's folder: absolute
    assert frame.read_text().splitlines()[:2] == [",file_name,label,valid", f"0,{ok_name},a,False"]
    assert spec.stat().st_size == ROW_BYTES
    again = cli("producer", "add-clips", str(tmp_path / "ok.wav"), "--label", "a", "--spec", str(spec), "--csv", str(frame), cwd=tmp_path / "new")
    assert again.returncode == 0 and spec.stat().st_size == ROW_BYTES  # from another folder: the same name, nothing twice


CRASH_BEFORE_CSV = """
import os, sys
from pathlib import Path
from producer.dataset import journal_path
from vggish_pipeline.core.files import appending
spec, frame = map(Path, sys.argv[1:3])
with appending([spec, frame], journal_path(spec)) as (rows, lines):
    rows.write(bytes(int(sys.argv[3])))
    rows.flush()
    os._exit(9)  # the .dat got its rows, then the process died
"""


def test_an_append_cut_off_mid_write_is_refused_then_rolled_back(sample, tmp_path, model_files, machine):
    from producer.dataset import journal_path
    from vggish_pipeline.core.files import appending

    before = sample["spec"].read_bytes(), sample["csv"].read_bytes()
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C between the two files: rolled back at once
        with appending([sample["spec"], sample["csv"]], journal_path(sample["spec"])) as (rows, _):
            rows.write(bytes(ROW_BYTES))
            rows.flush()
            raise KeyboardInterrupt
    assert (sample["spec"].read_bytes(), sample["csv"].read_bytes()) == before

    died = subprocess.run([sys.executable, "-c", CRASH_BEFORE_CSV, str(sample["spec"]), str(sample["csv"]), str(ROW_BYTES)])
    assert died.returncode == 9
    assert sample["spec"].stat().st_size == len(before[0]) + ROW_BYTES  # out of step on disk, journal present

    refused = cli("producer", "run", str(sample["spec"]), "--checkpoint", str(model_files["checkpoint"]))
    assert refused.returncode == 3 and "cut off mid-append" in refused.stderr and "Traceback" not in refused.stderr
    repaired = cli("producer", "add-clips", "--spec", str(sample["spec"]))
    assert repaired.returncode == 0 and "rolled back" in repaired.stderr
    assert (sample["spec"].read_bytes(), sample["csv"].read_bytes()) == before


def test_kill_9_during_add_clips_never_leaves_the_pair_out_of_step(sample, tmp_path):
    from producer.dataset import validate

    for i in range(60):
        write_wav(tmp_path / "rec" / f"c{i}.wav", tone(6.0, 300 + 5 * i, rate=48000), 48000)
    original = sample["spec"].read_bytes(), sample["csv"].read_bytes()
    outcomes = []
    for delay in (0.4, 0.6, 0.8, 1.0, 1.2, 1.5):  # import, conversion, and (on this machine ~1.3 s) the commit
        sample["spec"].write_bytes(original[0])
        sample["csv"].write_bytes(original[1])
        proc = subprocess.Popen(
            [sys.executable, "-m", "producer", "add-clips", str(tmp_path / "rec"), "--label", "tone", "--spec", str(sample["spec"])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert cli("producer", "add-clips", "--spec", str(sample["spec"])).returncode == 0  # rolls back if needed
        rows = validate(sample["spec"], sample["csv"])  # raises if the .dat and the CSV disagree
        assert rows in (SAMPLE_ROWS, SAMPLE_ROWS + 60 * 6)
        outcomes.append(rows)
        assert not list(sample["dir"].glob(".*"))  # no journal or staged rows left behind
    print("rows after each kill:", outcomes)


def run_watch(sample: dict, inbox: Path, model_files: dict, log: Path) -> subprocess.Popen:
    args = [sys.executable, "-m", "producer", "watch", str(inbox), "--label-from-folder", "--spec", str(sample["spec"])]
    args += ["--checkpoint", str(model_files["checkpoint"]), "--chunk-rows", "64", "--settle", "0.3", "--poll", "0.2"]
    with open(log, "wb") as out:
        # Not inherited from this process (conftest sets it for itself): watch must give its workers memory growth itself.
        env = {**merged_env({"TF_FORCE_GPU_ALLOW_GROWTH": None}), "PYTHONUNBUFFERED": "1"}
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)


def wait_for_log(proc: subprocess.Popen, log: Path, text: str, count: int, timeout: float = 180) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = log.read_text(errors="replace")
        if content.count(text) >= count:
            return content
        assert proc.poll() is None, f"watch exited:\n{content}"
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {count}x {text!r}:\n{log.read_text(errors='replace')}")


def test_watch_embeds_new_files_only_and_never_reads_a_file_half_written(sample, model_files, weights, expected, tmp_path, machine):
    inbox, log = tmp_path / "inbox", tmp_path / "watch.log"
    inbox.mkdir()
    proc = run_watch(sample, inbox, model_files, log)
    try:
        wait_for_log(proc, log, "outputs refreshed", 1)  # first the rows already there

        write_wav(inbox / "yes" / "one.wav", tone(1.0, 700))
        whole = wav_bytes(tone(3.0, 3000), 16000)  # a recorder that writes its header first, then the samples
        slow = inbox / "up" / "slow.wav"
        slow.parent.mkdir()
        with open(slow, "wb") as f:
            f.write(whole[: len(whole) // 2])
            f.flush()
            time.sleep(1.5)  # far past --settle: only the header's length says the file is not done
            f.write(whole[len(whole) // 2 :])
        (inbox / "loose.wav").write_bytes(wav_bytes(tone(1.0), 16000))  # no label folder
        wait_for_log(proc, log, f"outputs refreshed: {SAMPLE_ROWS + 4} rows", 1)
        wait_for_log(proc, log, "loose.wav: refused", 1)  # settled a moment after slow.wav: perhaps the next look
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    content = log.read_text()
    assert "stopped watching" in content and "Traceback" not in content
    assert "up/slow.wav: 3 rows added" in content and "yes/one.wav: 1 rows added" in content
    worker_logs = [p.read_text() for p in (sample["dir"] / "logs").glob("*.log")]  # memory growth before TensorFlow loaded
    assert worker_logs and all("GPU memory: growth on (TF_FORCE_GPU_ALLOW_GROWTH=true)" in text for text in worker_logs)

    refreshes = [line for line in content.splitlines() if line.startswith("outputs refreshed")]
    assert refreshes[0].startswith(f"outputs refreshed: {SAMPLE_ROWS} rows ({SAMPLE_ROWS} embedded")
    embedded = [int(line.split("(")[1].split()[0]) for line in refreshes[1:]]
    assert sum(embedded) == 4, refreshes  # later refreshes embed exactly the new rows, never an old one again

    assert sorted(p.relative_to(inbox).as_posix() for p in inbox.rglob("*") if p.is_file()) == [
        "added/up/slow.wav", "added/yes/one.wav", "failed/loose.wav", "failed/loose.wav.error.txt",
    ]
    assert (inbox / "added" / "up" / "slow.wav").read_bytes() == whole
    spectrograms = np.fromfile(sample["spec"]).reshape(-1, 96, 64)
    assert len(spectrograms) == SAMPLE_ROWS + 4
    new_names = pd.read_csv(sample["csv"], index_col=0)["file_name"].iloc[SAMPLE_ROWS:].drop_duplicates()
    new = np.concatenate([audio.file_examples(inbox / "added" / name) for name in new_names])
    np.testing.assert_array_equal(spectrograms[SAMPLE_ROWS:], new)
    all_expected = np.concatenate([expected["relu"], vggish(weights, new, relu_embedding=True)])
    check_outputs(sample["dir"], sample["csv"], all_expected)


def test_watch_once_with_running_workers_adds_and_embeds_then_exits(sample, workers, redis_url, weights, expected, tmp_path):
    """As from cron: a finished recording found in the inbox (last written two minutes ago) is
    taken at once, with the settle time a watch has; one written just now is left, and named."""
    inbox = tmp_path / "inbox"
    write_wav(inbox / "left" / "a.wav", tone(2.0, 900, rate=32000), 32000)
    old = time.time() - 120
    os.utime(inbox / "left" / "a.wav", (old, old))
    workers.start("w1", [sample["dir"]])
    write_wav(inbox / "left" / "b.wav", tone(1.0, 500, rate=32000), 32000)
    result = cli(
        "producer", "watch", str(inbox), "--label-from-folder", "--spec", str(sample["spec"]), "--broker", redis_url,
        "--settle", "60", "--once",
    )
    assert result.returncode == 0, result.stderr
    assert "left/a.wav: 2 rows added" in result.stderr and f"outputs refreshed: {SAMPLE_ROWS + 2} rows" in result.stderr
    assert "left/b.wav: still being written" in result.stderr and (inbox / "left" / "b.wav").exists()
    new = audio.file_examples(inbox / "added" / "left" / "a.wav")
    check_outputs(sample["dir"], sample["csv"], np.concatenate([expected["relu"], vggish(weights, new, relu_embedding=True)]))


def test_watch_replaces_a_dead_worker_and_stops_with_its_error_when_it_keeps_dying(sample, model_files, weights, expected, tmp_path, machine):
    from test_faults import descendants

    inbox, log = tmp_path / "inbox", tmp_path / "watch.log"
    inbox.mkdir()
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(model_files["checkpoint"].read_bytes())  # a copy this test may break
    args = [sys.executable, "-m", "producer", "watch", str(inbox), "--label", "new", "--spec", str(sample["spec"]),
            "--checkpoint", str(ckpt), "--workers", "1", "--chunk-rows", "64", "--settle", "0.3", "--poll", "0.2"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def worker_pid() -> int:
        found = [p for p in descendants(proc.pid) if b"worker\0start" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(found) == 1, found
        return found[0]

    try:
        wait_for_log(proc, log, "outputs refreshed", 1)
        os.kill(worker_pid(), signal.SIGKILL)
        wait_for_log(proc, log, "starting it again", 1)
        write_wav(inbox / "after.wav", tone(1.0, 500))
        wait_for_log(proc, log, f"outputs refreshed: {SAMPLE_ROWS + 1} rows", 1)  # the new worker embedded it

        ckpt.write_bytes(b"not a checkpoint any more" * 100)
        os.kill(worker_pid(), signal.SIGKILL)  # it dies, and every new one dies at start
        assert proc.wait(300) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
    content = log.read_text()
    assert "Traceback" not in content
    last = content.strip().splitlines()[-1]
    assert last.startswith("producer: error: worker local-") and "died 4 times in 10 minutes" in last, last
    assert "it said: worker: error: " in last and "not a readable TensorFlow checkpoint" in last, last
    new = audio.file_examples(inbox / "added" / "after.wav")
    check_outputs(sample["dir"], sample["csv"], np.concatenate([expected["relu"], vggish(weights, new, relu_embedding=True)]))


def test_add_clips_takes_every_format_and_rate_in_one_command(sample, tmp_path):
    rec = tmp_path / "rec"
    files = [
        write_audio(rec / "no" / "c.ogg", speech_like(2.1, 48000, 2, seed=3), 48000, "VORBIS"),
        write_audio(rec / "no" / "d.mp3", speech_like(1.5, 22050, 1, seed=4), 22050, "MPEG_LAYER_III"),
        write_audio(rec / "yes" / "a.wav", speech_like(1.2, 8000, 1, seed=1), 8000, "PCM_16"),
        write_audio(rec / "yes" / "b.flac", speech_like(3.0, 44100, 2, seed=2), 44100, "PCM_24"),
    ]
    (rec / "yes" / "notes.txt").write_text("not a recording")
    before = sample["spec"].stat().st_size
    result = add_clips(sample, str(rec), "--label-from-folder")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["files_added"] == 4

    frame = pd.read_csv(sample["csv"], index_col=0).iloc[SAMPLE_ROWS:]
    added = np.fromfile(sample["spec"], dtype="<f8", offset=before).reshape(-1, 96, 64)
    expected = {path.name: upstream_examples(path) for path in files}
    assert sum(len(rows) for rows in expected.values()) == len(added) == len(frame)
    at = 0
    for name in dict.fromkeys(Path(f).name for f in frame["file_name"]):  # in the CSV's order
        rows = expected.pop(name)
        np.testing.assert_allclose(added[at : at + len(rows)], rows, rtol=0, atol=1e-6)
        at += len(rows)
    assert not expected
    assert sorted(set(frame["label"])) == ["no", "yes"]


def test_watch_embeds_a_flac_and_moves_an_unreadable_recording_to_failed(sample, workers, redis_url, weights, expected, tmp_path):
    inbox = tmp_path / "inbox"
    write_audio(inbox / "take.flac", speech_like(2.0, 44100, 2), 44100, "PCM_16")
    (inbox / "broken.ogg").write_bytes(b"OggS" + bytes(200))
    workers.start("w1", [sample["dir"]])
    result = cli(
        "producer", "watch", str(inbox), "--label", "x", "--spec", str(sample["spec"]), "--broker", redis_url, "--settle", "0", "--once",
    )
    assert result.returncode == 0, result.stderr
    assert (inbox / "failed" / "broken.ogg").exists() and "cannot read audio" in (inbox / "failed" / "broken.ogg.error.txt").read_text()
    new = upstream_examples(inbox / "added" / "take.flac")
    np.testing.assert_allclose(np.fromfile(sample["spec"]).reshape(-1, 96, 64)[SAMPLE_ROWS:], new, rtol=0, atol=1e-6)
    check_outputs(sample["dir"], sample["csv"], np.concatenate([expected["relu"], vggish(weights, audio.file_examples(inbox / "added" / "take.flac"), relu_embedding=True)]))


def test_watch_takes_odd_names_and_inside_symlinks_and_refuses_what_a_service_must_not_read(sample, workers, redis_url, weights, expected, tmp_path):
    """Commas and quotes in a name are quoted in the CSV; a symlink to a file inside the inbox is
    read; a symlink out of the inbox or to nothing, a name with a line break and a name that is not
    UTF-8 go to failed/ with their reason, and no symlink's target outside is ever touched."""
    inbox = tmp_path / "inbox"
    real = write_wav(inbox / "yes" / "real.wav", tone(1.0, 700))
    write_wav(inbox / "yes" / 'a,b "c".wav', tone(1.0, 900))
    (inbox / "yes" / "link.wav").symlink_to("real.wav")
    secret = write_wav(tmp_path / "elsewhere" / "secret.wav", tone(1.0, 1100))
    (inbox / "yes" / "out.wav").symlink_to(secret)
    (inbox / "yes" / "dangling.wav").symlink_to(tmp_path / "nothing.wav")
    write_wav(inbox / "yes" / "line\nbreak.wav", tone(1.0, 1300))
    bad_bytes = os.fsencode(inbox / "yes") + b"/caf\xe9.wav"  # Latin-1, not UTF-8
    with open(bad_bytes, "wb") as f:
        f.write(wav_bytes(tone(1.0, 1500), 16000))
    old = time.time() - 120
    for path in (inbox / "yes").iterdir():
        os.utime(path, (old, old), follow_symlinks=False)
    workers.start("w1", [sample["dir"], inbox])
    result = cli("producer", "watch", str(inbox), "--label-from-folder", "--spec", str(sample["spec"]), "--broker", redis_url, "--once")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    frame = pd.read_csv(sample["csv"], index_col=0)
    assert frame["file_name"].tolist()[SAMPLE_ROWS:] == ['yes/a,b "c".wav', "yes/link.wav", "yes/real.wav"]
    failed = sorted(p.name for p in (inbox / "failed" / "yes").iterdir() if not p.name.endswith(".error.txt"))
    assert failed == sorted(["out.wav", "dangling.wav", "line\nbreak.wav", os.fsdecode(b"caf\xe9.wav")])
    assert "outside the inbox" in (inbox / "failed" / "yes" / "out.wav.error.txt").read_text()
    assert "a symlink to nothing" in (inbox / "failed" / "yes" / "dangling.wav.error.txt").read_text()
    assert "line break" in (inbox / "failed" / "yes" / "line\nbreak.wav.error.txt").read_text()
    assert secret.read_bytes() == wav_bytes(tone(1.0, 1100), 16000)  # untouched, still where it was
    added = [audio.file_examples(p) for p in (inbox / "added" / "yes" / 'a,b "c".wav', real.parent.parent / "added" / "yes" / "link.wav", inbox / "added" / "yes" / "real.wav")]
    new = np.concatenate(added)
    check_outputs(sample["dir"], sample["csv"], np.concatenate([expected["relu"], vggish(weights, new, relu_embedding=True)]))


def test_watch_autoscale_starts_a_local_worker_per_arrival_and_lets_it_go_between(sample, model_files, weights, expected, tmp_path, machine):
    """`watch --autoscale 0:1`: no worker waits while nothing lands; the first look's job brings one
    up, which leaves once idle; a recording landing later brings one back; outputs equal the reference."""
    inbox, log = tmp_path / "inbox", tmp_path / "watch.log"
    inbox.mkdir()
    args = [sys.executable, "-m", "producer", "watch", str(inbox), "--label-from-folder", "--spec", str(sample["spec"]),
            "--checkpoint", str(model_files["checkpoint"]), "--chunk-rows", "64", "--settle", "0.3", "--poll", "0.2",
            "--autoscale", "0:1", "--scale-idle", "2"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env={**merged_env(None), "PYTHONUNBUFFERED": "1"})
    try:
        wait_for_log(proc, log, f"outputs refreshed: {SAMPLE_ROWS} rows", 1)
        wait_for_log(proc, log, "left, idle (0 running)", 1)  # no process holds a device between arrivals
        clip = write_wav(tmp_path / "made" / "later.wav", tone(1.0, 650))
        new = audio.file_examples(clip)
        (inbox / "yes").mkdir()
        clip.rename(inbox / "yes" / "later.wav")
        text = wait_for_log(proc, log, f"outputs refreshed: {SAMPLE_ROWS + 1} rows", 1)
        assert text.count("starting local-") == 2, text  # one for the first look, one for the arrival
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert "Traceback" not in log.read_text()
    check_outputs(sample["dir"], sample["csv"], np.concatenate([expected["relu"], vggish(weights, new, relu_embedding=True)]))
