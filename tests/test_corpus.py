"""A recorded corpus in the Speech Commands layout into the seed's frame: `producer add-clips` with
--rows-per-file 1, --valid-list and --bad-files, on several processes, then embedded."""

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
import pandas as pd
import pytest
from conftest import cli, unavailable
from outputs import check_outputs
from reference import upstream_examples, vggish
from wavs import speech_like, tone, write_audio, write_wav

# (label, file, espeak-ng speed in words/min, pitch): fast words are under 0.975 s (padded), slow ones over
WORDS = [("yes", "0a2b3c4d_nohash_0", 175, 50), ("yes", "1f00aa11_nohash_1", 60, 40), ("no", "0a2b3c4d_nohash_0", 140, 70),
         ("no", "7e7e7e7e_nohash_0", 175, 30), ("seven", "3c3c3c3c_nohash_0", 80, 55)]
DAMAGED = "no/ffffffff_nohash_0.wav"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Speech Commands v0.02's layout: label folders of one-word WAVs, a long recording in
    _background_noise_, the split lists at the root, and files that are not audio."""
    if shutil.which("espeak-ng") is None:
        unavailable("no espeak-ng (apt-get install espeak-ng): it speaks the test corpus's words")
    root = tmp_path_factory.mktemp("speech_commands")
    for label, stem, speed, pitch in WORDS:
        (root / label).mkdir(exist_ok=True)
        subprocess.run(["espeak-ng", "-s", str(speed), "-p", str(pitch), "-w", str(root / label / f"{stem}.wav"), label], check=True)
    write_audio(root / "_background_noise_" / "running_tap.wav", speech_like(6.5, 16000), 16000, "PCM_16")
    (root / "_background_noise_" / "README.md").write_text("long recordings of noise\n")
    (root / DAMAGED).write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt junk")  # a header cut off
    (root / "validation_list.txt").write_text("no/0a2b3c4d_nohash_0.wav\nyes/1f00aa11_nohash_1.wav\n")
    (root / "testing_list.txt").write_text("seven/3c3c3c3c_nohash_0.wav\n")
    (root / "LICENSE").write_text("CC BY 4.0\n")
    return root


def add_corpus(root: Path, spec: Path, *extra: str) -> subprocess.CompletedProcess:
    return cli("producer", "add-clips", str(root), "--label-from-folder", "--rows-per-file", "1",
               "--valid-list", str(root / "validation_list.txt"), "--spec", str(spec), *extra)


def test_a_speech_commands_folder_becomes_one_row_per_file_in_parallel_and_is_embedded(corpus, tmp_path, workers, redis_url, weights):
    spec = tmp_path / "par" / "wavfile_spec.dat"
    result = add_corpus(corpus, spec, "--bad-files", str(tmp_path / "bad.csv"), "--jobs", "2", "--json")
    assert result.returncode == 5, result.stderr  # done, and some were skipped
    assert result.stderr.strip().splitlines()[-1] == f"1 file refused and skipped, listed in {tmp_path / 'bad.csv'}"
    summary = json.loads(result.stdout)
    assert (summary["files_added"], summary["files_refused"], summary["rows"]) == (6, 1, 6)

    report = pd.read_csv(tmp_path / "bad.csv")
    assert report["file"].tolist() == [str(corpus / DAMAGED)] and "cannot read audio" in report["reason"][0]

    frame = pd.read_csv(spec.with_name("wavfile_df.csv"), index_col=0)
    audio_files = sorted(p for p in corpus.rglob("*.wav") if p.relative_to(corpus).as_posix() != DAMAGED)
    assert frame["file_name"].tolist() == [str(p) for p in audio_files]  # one row per file, whatever its length
    assert frame["label"].tolist() == [p.parent.name for p in audio_files]  # _background_noise_ as its folder says
    listed = set((corpus / "validation_list.txt").read_text().split())
    assert frame["valid"].tolist() == [p.relative_to(corpus).as_posix() in listed for p in audio_files]
    assert frame["valid"].sum() == 2

    rows = np.fromfile(spec).reshape(-1, 96, 64)
    short = 0
    for row, path in zip(rows, audio_files, strict=True):
        reference = upstream_examples(path, pad=True)
        short += len(upstream_examples(path)) == 0
        np.testing.assert_allclose(row, reference[0], rtol=0, atol=1e-6)  # the first example, padded where short
    assert short >= 2  # the test has clips under 0.975 s

    one = tmp_path / "one" / "wavfile_spec.dat"
    assert add_corpus(corpus, one, "--bad-files", str(tmp_path / "bad1.csv"), "--jobs", "1").returncode == 5
    assert one.read_bytes() == spec.read_bytes()  # byte for byte as one process
    assert one.with_name("wavfile_df.csv").read_bytes() == spec.with_name("wavfile_df.csv").read_bytes()

    workers.start("w1", [spec.parent])
    run = cli("producer", "run", str(spec), "--broker", redis_url, "--chunk-rows", "4")
    assert run.returncode == 0, run.stderr
    check_outputs(spec.parent, spec.with_name("wavfile_df.csv"), vggish(weights, rows, relu_embedding=True))


def test_without_a_report_one_damaged_file_refuses_the_corpus_and_says_how_to_add_the_rest(corpus, tmp_path):
    spec = tmp_path / "wavfile_spec.dat"
    result = add_corpus(corpus, spec)
    assert result.returncode == 3 and "Traceback" not in result.stderr
    assert "1 of 7 files refused" in result.stderr and "--bad-files" in result.stderr
    assert not spec.exists() and not spec.with_name("wavfile_df.csv").exists()  # no pair made


def producer_processes(spec: Path) -> list[int]:
    """Every process whose command line names `spec`: the add and the processes it forked."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and str(spec).encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                found.append(int(entry))
        except OSError:
            pass
    return found


def test_kill_9_mid_add_then_the_same_command_equals_an_uninterrupted_run(tmp_path):
    root = tmp_path / "corpus"
    for i in range(240):
        write_wav(root / ("yes", "no", "up")[i % 3] / f"{i:04d}_nohash_0.wav", tone(2.0, 200 + 3 * i, rate=44100) * 0.8, 44100)
    (root / "validation_list.txt").write_text("".join(f"up/{i:04d}_nohash_0.wav\n" for i in range(2, 240, 3)))
    whole = tmp_path / "whole" / "wavfile_spec.dat"
    assert add_corpus(root, whole, "--jobs", "2").returncode == 0

    spec = tmp_path / "cut" / "wavfile_spec.dat"
    args = [sys.executable, "-m", "producer", "add-clips", str(root), "--label-from-folder", "--rows-per-file", "1",
            "--valid-list", str(root / "validation_list.txt"), "--spec", str(spec), "--jobs", "2"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (spec.exists() and spec.stat().st_size):  # rows are being appended
        assert proc.poll() is None and time.monotonic() < deadline, "the add ended before it could be cut"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 5
    while producer_processes(spec):  # the converting processes follow their parent
        assert time.monotonic() < deadline, f"left running: {producer_processes(spec)}"
        time.sleep(0.1)

    again = add_corpus(root, spec, "--jobs", "2")
    assert again.returncode == 0, again.stderr
    assert spec.read_bytes() == whole.read_bytes()
    assert spec.with_name("wavfile_df.csv").read_bytes() == whole.with_name("wavfile_df.csv").read_bytes()
    assert not list(spec.parent.glob(".*"))  # no journal or staged rows left behind
