"""GPU topologies, simulated by a stand-in nvidia-smi on PATH, met by real `producer run` and
`worker up` processes: every granted device gets one worker pinned to exactly it, by UUID, on the
CPUs near it; a granted subset and MIG slices are honoured; a missing, failing or hanging
nvidia-smi means CPU workers. TensorFlow sees no GPU behind the stand-in's UUIDs, so the workers
really run on the CPU, and the outputs must still equal the reference."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cli, merged_env
from outputs import check_outputs
from test_faults import wait_for

from vggish_pipeline.core.devices import (
    Device,
    NvidiaSmiError,
    discover,
    granted,
    parse_list,
    parse_query,
    parse_topology,
    threads_per_worker,
    usable,
)

STANDIN = Path(__file__).parent / "standin"


def uuid(i: int) -> str:
    return f"GPU-{i:08x}-aaaa-bbbb-cccc-standin{i:05d}"


def near_halves() -> list[set[int]]:
    """The stand-in's default topology: GPUs 0-1 near the first half of our CPUs, 2-3 near the rest."""
    cpus = sorted(os.sched_getaffinity(0))
    half = max(1, len(cpus) // 2)
    return [set(cpus[:half]), set(cpus[half:] or cpus[:half])]


def gpu_env(layout: dict | None = None, visible: str | None = None, standin: bool = True, **extra: str) -> dict:
    """Environment for a run on the simulated machine. CUDA_VISIBLE_DEVICES is unset unless given."""
    path = os.environ["PATH"]
    if not standin:  # no nvidia-smi at all: only the folder of this Python, which has no nvidia-smi
        path = str(Path(sys.executable).parent)
    # Behind the stand-in's UUIDs TensorFlow sees no GPU: these workers compute on the CPU only because this allows it.
    # Memory growth is not inherited from this process (conftest sets it for itself): the commands must set it.
    env = {"PATH": f"{STANDIN}{os.pathsep}{path}" if standin else path, "CUDA_VISIBLE_DEVICES": visible,
           "VGGISH_ALLOW_CPU_FALLBACK": "1", "TF_FORCE_GPU_ALLOW_GROWTH": None, **extra}
    env["STANDIN_GPUS"] = json.dumps(layout) if layout else None
    return env


MIG_LAYOUT = {
    "gpus": [
        {
            "name": "NVIDIA A100-SXM4-40GB",
            "uuid": uuid(0),
            "cpus": "0",
            "mig": [
                {"profile": "3g.20gb", "uuid": "MIG-aaaaaaaa-0000-5000-8000-000000000001"},
                {"profile": "3g.20gb", "uuid": "MIG-aaaaaaaa-0000-5000-8000-000000000002"},
            ],
        },
        {"name": "NVIDIA A100-SXM4-40GB", "uuid": uuid(1), "cpus": "N/A"},
    ]
}


# --- the device model, on nvidia-smi's own text ---------------------------------------------


def test_listing_gives_gpus_and_mig_slices_instead_of_their_gpu():
    query = (
        "0, GPU-11111111-2222-3333-4444-555555555555, NVIDIA A100-SXM4-80GB, Enabled\n"
        "1, GPU-66666666-7777-8888-9999-000000000000, Tesla V100-SXM2-16GB, [N/A]\n"
        "2, GPU-abcdef01-2222-3333-4444-555555555555, NVIDIA A100-PCIE-40GB, Enabled\n"
        "3, GPU-abcdef02-2222-3333-4444-555555555555, NVIDIA A100-PCIE-40GB, Disabled\n"
    )
    listing = (
        "GPU 0: NVIDIA A100-SXM4-80GB (UUID: GPU-11111111-2222-3333-4444-555555555555)\n"
        "  MIG 1g.10gb     Device  0: (UUID: MIG-a1b2c3d4-0000-5000-8000-000000000001)\n"
        "  MIG 1g.10gb     Device  1: (UUID: MIG-a1b2c3d4-0000-5000-8000-000000000002)\n"
        "GPU 1: Tesla V100-SXM2-16GB (UUID: GPU-66666666-7777-8888-9999-000000000000)\n"
        "GPU 2: NVIDIA A100-PCIE-40GB (UUID: GPU-abcdef01-2222-3333-4444-555555555555)\n"
        "  MIG 3g.20gb Device 0: (UUID: MIG-GPU-abcdef01-2222-3333-4444-555555555555/1/0)\n"  # drivers before R470
        "GPU 3: NVIDIA A100-PCIE-40GB (UUID: GPU-abcdef02-2222-3333-4444-555555555555)\n"
    )
    devices, notes = usable(parse_query(query)[0], parse_list(listing))
    assert [(d.index, d.uuid, d.parent) for d in devices] == [
        ("0:0", "MIG-a1b2c3d4-0000-5000-8000-000000000001", "GPU-11111111-2222-3333-4444-555555555555"),
        ("0:1", "MIG-a1b2c3d4-0000-5000-8000-000000000002", "GPU-11111111-2222-3333-4444-555555555555"),
        ("1", "GPU-66666666-7777-8888-9999-000000000000", None),
        ("2:0", "MIG-GPU-abcdef01-2222-3333-4444-555555555555/1/0", "GPU-abcdef01-2222-3333-4444-555555555555"),
        ("3", "GPU-abcdef02-2222-3333-4444-555555555555", None),
    ]
    assert devices[0].name == "MIG 1g.10gb of NVIDIA A100-SXM4-80GB" and devices[2].name == "Tesla V100-SXM2-16GB"
    assert [d.short for d in devices] == ["gpu0-mig0", "gpu0-mig1", "gpu1", "gpu2-mig0", "gpu3"]
    assert notes == []


# What real drivers print, written after captures from real machines (the public nvidia_gpu_exporter
# project's captures: an H200 and an H100 in MIG mode and an L40S on driver 590-595, their UUIDs masked).
H200_MIG_QUERY = "0, GPU-00000000-0000-0000-0000-000000000000, NVIDIA H200, Enabled\n"
H200_MIG_LIST = (
    "GPU 0: NVIDIA H200 (UUID: GPU-00000000-0000-0000-0000-000000000000)\n"
    "  MIG 1c.3g.71gb  Device  0: (UUID: MIG-00000000-0000-0000-0000-000000000000)\n"
    "  MIG 2c.3g.71gb  Device  1: (UUID: MIG-00000001-0000-0000-0000-000000000001)\n"
    "  MIG 2g.35gb     Device  2: (UUID: MIG-00000002-0000-0000-0000-000000000002)\n"
    "  MIG 1g.18gb     Device  3: (UUID: MIG-00000003-0000-0000-0000-000000000003)\n"
    "  MIG 1g.18gb     Device  4: (UUID: MIG-00000004-0000-0000-0000-000000000004)\n\n"
)
ANSI_TOPOLOGY = (  # drivers 590 and 595 underline the header row
    "\t\x1b[4mGPU0\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\x1b[0m\n"
    "GPU0\t X \t0-23\t0\t\tN/A\n\nLegend:\n\n  X    = Self\n"
)


def test_captured_outputs_of_real_drivers_read_as_their_devices():
    devices, notes = usable(parse_query(H200_MIG_QUERY)[0], parse_list(H200_MIG_LIST))
    assert [(d.index, d.uuid, d.name) for d in devices] == [
        ("0:0", "MIG-00000000-0000-0000-0000-000000000000", "MIG 1c.3g.71gb of NVIDIA H200"),
        ("0:1", "MIG-00000001-0000-0000-0000-000000000001", "MIG 2c.3g.71gb of NVIDIA H200"),
        ("0:2", "MIG-00000002-0000-0000-0000-000000000002", "MIG 2g.35gb of NVIDIA H200"),
        ("0:3", "MIG-00000003-0000-0000-0000-000000000003", "MIG 1g.18gb of NVIDIA H200"),
        ("0:4", "MIG-00000004-0000-0000-0000-000000000004", "MIG 1g.18gb of NVIDIA H200"),
    ]
    assert parse_topology(ANSI_TOPOLOGY) == {"0": tuple(range(24))}
    l40s = parse_query("0, GPU-00000000-0000-0000-0000-000000000000, NVIDIA L40S, [N/A]\n")[0]
    assert usable(l40s, {})[0] == [Device("0", "GPU-00000000-0000-0000-0000-000000000000", "NVIDIA L40S")]


def test_a_mig_gpu_without_slices_is_no_device_and_unreadable_output_is_refused():
    devices, notes = usable(parse_query(H200_MIG_QUERY)[0], {"GPU-00000000-0000-0000-0000-000000000000": []})
    assert devices == [] and "is in MIG mode with no MIG devices: not used" in notes[0]
    with pytest.raises(NvidiaSmiError, match="unexpected line"):
        parse_query("GPU 0: NVIDIA H200 (UUID: GPU-0)\n")  # another output format than the one asked for
    gpus, errors = parse_query("Unable to determine the device handle for GPU0000:1B:00.0: GPU is lost.\n"
                               "1, GPU-1, NVIDIA H100, Disabled\n", strict=False)  # a failing exit: error lines are kept as such
    assert [g.uuid for g in gpus] == ["GPU-1"] and errors[0].startswith("Unable to determine")
    with pytest.raises(NvidiaSmiError, match="not a tab-separated cell"):
        parse_topology("   GPU0   CPU Affinity   NUMA Affinity\nGPU0    X    0-23    0\n")


@pytest.mark.parametrize(
    "layout, devices, said",
    [
        ({"gpus": [{"name": "NVIDIA H100", "uuid": uuid(0), "lost": True}, {"name": "NVIDIA H100", "uuid": uuid(1), "cpus": "0"}]},
         [uuid(1)], "nvidia-smi exited 15 but listed 1 GPUs; those are used (Unable to determine the device handle for GPU0000:1B:00.0: GPU is lost."),
        ({"gpus": [{"name": "NVIDIA H200", "uuid": uuid(0), "mig": []}, {"name": "NVIDIA H200", "uuid": uuid(1)}]},
         [uuid(1)], f"GPU 0 NVIDIA H200 ({uuid(0)}) is in MIG mode with no MIG devices: not used"),
        ({"gpus": [{"name": "NVIDIA H100", "uuid": uuid(0), "lost": True}]}, [],
         "no GPUs used: nvidia-smi --query-gpu=index,uuid,name,mig.mode.current --format=csv,noheader failed (exit 15): Unable to determine"),
    ],
    ids=["one-gpu-lost", "mig-without-slices", "every-gpu-lost"],
)
def test_discovery_on_a_failing_gpu_keeps_the_others_and_says_why(monkeypatch, layout, devices, said):
    for name, value in gpu_env(layout).items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    discovery = discover()
    assert [d.uuid for d in discovery.devices] == devices
    assert any(note.startswith(said) for note in discovery.notes), discovery.notes


def test_topology_gives_each_gpu_its_cpu_affinity():
    matrix = (
        "\tGPU0\tGPU1\tNIC0\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\n"
        "GPU0\t X \tSYS\tPHB\t0-3,8-11\t0\t\tN/A\n"
        "GPU1\tSYS\t X \tSYS\tN/A\tN/A\t\tN/A\n"
        "NIC0\tPHB\tSYS\t X \t\t\t\t\n\nLegend:\n\n  X    = Self\n"
    )
    assert parse_topology(matrix) == {"0": (0, 1, 2, 3, 8, 9, 10, 11), "1": ()}


def test_cuda_visible_devices_is_read_by_cudas_rules():
    gpus = [Device(str(i), uuid(i), "A100") for i in range(4)]
    assert granted(gpus, None) == (gpus, [])
    assert granted(gpus, "") == ([], []) and granted(gpus, "-1") == ([], [])
    assert granted(gpus, "3,1")[0] == [gpus[3], gpus[1]]  # the order given
    assert granted(gpus, f"{uuid(2)},GPU-00000000")[0] == [gpus[2], gpus[0]]  # UUIDs and unique prefixes
    subset, notes = granted(gpus, "0,2,-1,1")  # CUDA ignores everything from the first invalid entry on
    assert subset == [gpus[0], gpus[2]] and "ignores -1,1" in notes[0]
    assert granted(gpus, "GPU-0000")[0] == []  # a prefix of several UUIDs names none
    slices = parse_list(f"GPU 0: A100 (UUID: {uuid(0)})\n  MIG 1g.5gb Device 0: (UUID: MIG-x1)\n  MIG 1g.5gb Device 1: (UUID: MIG-x2)\n")[uuid(0)]
    assert granted(slices, "0")[0] == slices and granted(slices, uuid(0))[0] == slices  # a MIG GPU grants its slices
    assert granted(slices, "MIG-x2")[0] == [slices[1]] and granted(slices, "0:1")[0] == [slices[1]]


# --- real workers on simulated machines ------------------------------------------------------


def worker_pins(log_dir: Path) -> dict[str, tuple[str, str]]:
    """Each worker's own report at start: (CUDA_VISIBLE_DEVICES, CPUs) by worker name."""
    pins = {}
    for log in sorted(log_dir.glob("*.log")):
        m = re.search(r"(\S+): pinned to .*?, CUDA_VISIBLE_DEVICES=(\S+), CPUs (\S+)\n", log.read_text())
        assert m, log.read_text()
        pins[m[1].split("@")[0]] = (m[2], m[3])
    return pins


def cpus_text(cpus: set[int]) -> str:
    from vggish_pipeline.core.devices import cpu_list

    return cpu_list(cpus)


def run(sample: dict, model_files: dict, env: dict, *flags: str) -> tuple[dict, str]:
    result = cli("producer", "run", str(sample["spec"]), "--checkpoint", str(model_files["checkpoint"]), "--json", *flags, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def test_plain_run_uses_every_gpu_one_worker_each_pinned_by_uuid_near_its_cpus(sample, model_files, expected):
    summary, stderr = run(sample, model_files, gpu_env())
    near = near_halves()
    started = {w["name"].split("@")[0]: w for w in summary["workers"]}
    assert sorted(started) == ["local-gpu0", "local-gpu1", "local-gpu2", "local-gpu3"]
    assert [started[f"local-gpu{i}"]["uuid"] for i in range(4)] == [uuid(i) for i in range(4)]
    assert "on 4 local workers: local-gpu0 on GPU 0 NVIDIA A100-SXM4-40GB" in stderr
    pins = worker_pins(sample["dir"] / "logs")
    assert pins == {f"local-gpu{i}": (uuid(i), cpus_text(near[i // 2])) for i in range(4)}
    for log in (sample["dir"] / "logs").glob("*.log"):  # memory growth was in each worker's environment before TensorFlow loaded
        assert "GPU memory: growth on (TF_FORCE_GPU_ALLOW_GROWTH=true)" in log.read_text()
    check_outputs(sample["dir"], sample["csv"], expected["relu"])
    per_worker = json.loads(cli("producer", "status", str(sample["dir"]), "--json").stdout)["workers"]
    assert set(per_worker) <= {w["name"] for w in summary["workers"]}


@pytest.mark.parametrize(
    "visible, chosen",
    [("1,3", [1, 3]), (f"{uuid(2)},GPU-00000000", [2, 0])],
    ids=["indices", "uuids"],
)
def test_run_uses_only_the_gpus_cuda_visible_devices_grants(sample, model_files, expected, visible, chosen):
    summary, _ = run(sample, model_files, gpu_env(visible=visible))
    assert [w["uuid"] for w in summary["workers"]] == [uuid(i) for i in chosen]
    assert {v[0] for v in worker_pins(sample["dir"] / "logs").values()} == {uuid(i) for i in chosen}
    check_outputs(sample["dir"], sample["csv"], expected["relu"])


def test_workers_caps_the_fleet_and_says_so(sample, model_files, expected):
    summary, _ = run(sample, model_files, gpu_env(), "--workers", "2")
    assert [w["uuid"] for w in summary["workers"]] == [uuid(0), uuid(1)]
    summary, stderr = run(sample, model_files, gpu_env(visible="2"), "--workers", "3")
    assert [w["uuid"] for w in summary["workers"]] == [uuid(2)]
    assert "--workers 3: 1 GPUs are granted, so 1 workers start" in stderr
    check_outputs(sample["dir"], sample["csv"], expected["relu"])


def test_mig_slices_are_devices_and_their_gpu_is_not(sample, model_files, expected):
    summary, _ = run(sample, model_files, gpu_env(MIG_LAYOUT))
    assert [(w["name"].split("@")[0], w["uuid"]) for w in summary["workers"]] == [
        ("local-gpu0-mig0", "MIG-aaaaaaaa-0000-5000-8000-000000000001"),
        ("local-gpu0-mig1", "MIG-aaaaaaaa-0000-5000-8000-000000000002"),
        ("local-gpu1", uuid(1)),
    ]
    pins = worker_pins(sample["dir"] / "logs")
    allowed = os.sched_getaffinity(0)
    assert pins["local-gpu0-mig0"] == ("MIG-aaaaaaaa-0000-5000-8000-000000000001", cpus_text({0} & allowed or allowed))
    assert pins["local-gpu1"] == (uuid(1), cpus_text(allowed))  # N/A: its CPUs are left alone
    check_outputs(sample["dir"], sample["csv"], expected["relu"])


@pytest.mark.parametrize(
    "env, said",
    [
        (gpu_env(standin=False), None),
        (gpu_env({"fail": True}), "no GPUs used: nvidia-smi --query-gpu=index,uuid,name,mig.mode.current --format=csv,noheader "
                                  "failed (exit 9): NVIDIA-SMI has failed"),
        (gpu_env({"hang": True}, VGGISH_NVIDIA_SMI_TIMEOUT="2"),
         "no GPUs used: nvidia-smi --query-gpu=index,uuid,name,mig.mode.current --format=csv,noheader did not answer in 2 s"),
        (gpu_env(visible="-1"), None),
    ],
    ids=["missing", "failing", "hanging", "none-granted"],
)
def test_no_usable_nvidia_smi_means_one_cpu_worker(sample, model_files, expected, env, said):
    began = time.monotonic()
    summary, stderr = run(sample, model_files, env)
    assert [(w["name"].split("@")[0], w["device"]) for w in summary["workers"]] == [("local-cpu0", "CPU")]
    if said:
        assert stderr.count(said) == 1, stderr  # said once
    else:
        assert "nvidia-smi" not in stderr and "GPU" not in stderr
    assert time.monotonic() - began < 120
    left = subprocess.run(["pgrep", "-f", str(STANDIN)], capture_output=True, text=True).stdout
    assert not left, f"a stand-in nvidia-smi outlived the run: {left}"
    check_outputs(sample["dir"], sample["csv"], expected["relu"])


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def start_up(flags: list[str], env: dict, redis_url: str, checkpoint: Path, root: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "worker", "up", *flags, "--broker", redis_url, "--checkpoint", str(checkpoint), "--data-root", str(root)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=merged_env(env))


def stop_up(up: subprocess.Popen) -> str:
    up.send_signal(signal.SIGTERM)
    return up.communicate(timeout=120)[0]


def test_worker_up_pins_each_process_to_its_device_and_cpus(redis_url, model_files, tmp_path):
    """Read from the live processes themselves: their environment and their CPU affinity."""
    from vggish_pipeline.core.broker import make_app
    from vggish_pipeline.core.settings import Settings

    near = near_halves()
    up = start_up(["--gpus", "all"], gpu_env(), redis_url, model_files["checkpoint"], tmp_path)
    try:
        app = make_app(redis_url, Settings())
        wait_for(lambda: len(app.control.ping(timeout=0.5)) == 4, timeout=180, what="four workers ready")
        pins = {}
        for pid in children(up.pid):
            env = environ(pid)
            pins[env["CUDA_VISIBLE_DEVICES"]] = (env["CUDA_DEVICE_ORDER"], os.sched_getaffinity(pid))
            assert env["TF_FORCE_GPU_ALLOW_GROWTH"] == "true"  # in its environment from the start, before its TensorFlow loads
        assert pins == {uuid(i): ("PCI_BUS_ID", near[i // 2]) for i in range(4)}
        live = app.control.broadcast("vggish_info", reply=True, timeout=1.0)
        pinned = sorted(info["pinned"] for reply in live for info in reply.values())
        assert pinned == sorted(f"GPU {i} NVIDIA A100-SXM4-40GB ({uuid(i)})" for i in range(4))
    finally:
        output = stop_up(up)
    assert output.count("TensorFlow sees no GPU there") == 4, output
    assert output.count("as VGGISH_ALLOW_CPU_FALLBACK=1 allows") == 4, output


def test_worker_up_takes_indices_and_uuids_and_refuses_what_is_not_granted(redis_url, model_files, tmp_path):
    up = start_up(["--gpus", f"3,{uuid(1)[:12]}"], gpu_env(), redis_url, model_files["checkpoint"], tmp_path)
    try:
        wait_for(lambda: len(children(up.pid)) == 2, timeout=30, what="two workers")
        assert sorted(environ(pid)["CUDA_VISIBLE_DEVICES"] for pid in children(up.pid)) == [uuid(1), uuid(3)]
    finally:
        stop_up(up)
    refused = cli("worker", "up", "--gpus", "2", "--broker", redis_url, env=gpu_env(visible="0,1"))
    assert refused.returncode == 3
    assert refused.stderr.strip().splitlines() == [
        f"worker: error: GPU '2' is not among the devices granted to this process: 0 ({uuid(0)}), 1 ({uuid(1)})"
    ]
    none = cli("worker", "up", "--gpus", "all", "--broker", redis_url, env=gpu_env(standin=False))
    assert none.returncode == 3 and none.stderr.startswith("worker: error: no GPU is granted to this process")


def test_worker_start_on_a_mig_gpu_asks_for_one_slice(redis_url, model_files, tmp_path):
    result = cli("worker", "start", "--gpu", "0", "--broker", redis_url, "--checkpoint", str(model_files["checkpoint"]),
                 "--data-root", str(tmp_path), env=gpu_env(MIG_LAYOUT))
    assert result.returncode == 3
    assert result.stderr.strip().splitlines()[-1] == (
        "worker: error: --gpu 0 names 2 MIG slices; give one: 0:0 (MIG-aaaaaaaa-0000-5000-8000-000000000001), "
        "0:1 (MIG-aaaaaaaa-0000-5000-8000-000000000002)"
    )


def test_cpu_workers_split_the_cores_whatever_the_machine(redis_url, model_files, tmp_path):
    up = start_up(["--cpus", "2"], gpu_env(), redis_url, model_files["checkpoint"], tmp_path)
    try:
        wait_for(lambda: len(children(up.pid)) == 2, timeout=30, what="two workers")
        for pid in children(up.pid):
            cmdline = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
            assert environ(pid)["CUDA_VISIBLE_DEVICES"] == "-1"
            assert cmdline[cmdline.index("--threads") + 1] == str(threads_per_worker(2))
    finally:
        stop_up(up)


def test_tf32_workers_have_a_model_id_of_their_own(sample, model_files, expected, redis_url, workers):
    """TF32 (opt-in) and float32 embeddings never meet in one job. Run on the CPU, where TF32 does
    not apply, so the outputs must still equal the reference."""
    summary, _ = run(sample, model_files, {"VGGISH_TF32": "1", "CUDA_VISIBLE_DEVICES": "-1"})
    assert summary["model"].endswith("+tf32")
    check_outputs(sample["dir"], sample["csv"], expected["relu"])

    other = sample["dir"].parent / "float32"
    enqueued = cli("producer", "enqueue", str(sample["spec"]), "--out", str(other), "--broker", redis_url,
                   "--checkpoint", str(model_files["checkpoint"]), "--chunk-rows", "200", env={"VGGISH_TF32": None})
    assert enqueued.returncode == 0, enqueued.stderr
    workers.start("tf32", [sample["dir"].parent], "--tf32")
    waited = cli("producer", "wait", str(other), "--broker", redis_url, "--timeout", "15")
    assert waited.returncode == 4 and "no live worker has this job's model" in waited.stderr, waited.stderr
    assert "+tf32" in waited.stderr and "handed back" in workers.log("tf32")  # handed back, not failed
    assert json.loads(cli("producer", "status", str(other), "--json").stdout)["failed"] == []


def test_a_worker_pinned_to_a_gpu_tensorflow_cannot_see_stops_with_tensorflows_reason(sample, model_files, redis_url, tmp_path):
    """No silent CPU: without VGGISH_ALLOW_CPU_FALLBACK the stand-in's GPU stops the worker at start
    (TensorFlow here has no CUDA driver behind it, and says so), and a run whose workers all do so."""
    env = gpu_env(VGGISH_ALLOW_CPU_FALLBACK=None)
    began = time.monotonic()
    result = cli("worker", "start", "--gpu", "1", "--broker", redis_url, "--checkpoint", str(model_files["checkpoint"]),
                 "--data-root", str(tmp_path), env=env)
    assert result.returncode == 3 and time.monotonic() - began < 60
    errors = [line for line in result.stderr.splitlines() if line.startswith("worker: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert errors[0].startswith(f"worker: error: pinned to GPU 1 NVIDIA A100-SXM4-40GB ({uuid(1)}), but TensorFlow sees no GPU there: ")
    assert "TensorFlow said: " in errors[0] or "built without CUDA" in errors[0]
    assert errors[0].endswith("or set VGGISH_ALLOW_CPU_FALLBACK=1 to compute on the CPU (~100x slower)")
    run = cli("producer", "run", str(sample["spec"]), "--checkpoint", str(model_files["checkpoint"]), env=env)
    assert run.returncode == 3 and run.stderr.strip().splitlines()[-1].startswith("producer: error: all workers exited; local-gpu0@")
    assert "but TensorFlow sees no GPU there" in run.stderr and not (sample["dir"] / "wavfile_embed.dat").exists()


@pytest.mark.parametrize(
    "env, lines, code",
    [
        (gpu_env(standin=False), ["granted: CUDA_VISIBLE_DEVICES=", "CPU: embeds (16 rows)", "no GPU: workers compute on the CPU",
                                  "all checks passed"], 0),
        (gpu_env({"gpus": [{"name": "NVIDIA H100 80GB HBM3", "uuid": uuid(0), "cpus": "0"}]}, VGGISH_ALLOW_CPU_FALLBACK=None),
         ["1 device(s): 0 NVIDIA H100 80GB HBM3", "memory: growth on (TF_FORCE_GPU_ALLOW_GROWTH=true), no limit; CUDA JIT cache ", "CPU: embeds",
          f"GPU 0 NVIDIA H100 80GB HBM3 ({uuid(0)}): FAILED: TensorFlow sees no GPU there: ", "1 problem(s): see above"], 3),
        (gpu_env({"gpus": [{"name": "NVIDIA H100 80GB HBM3", "uuid": uuid(0)}]}),
         [f"GPU 0 NVIDIA H100 80GB HBM3 ({uuid(0)}): TensorFlow sees no GPU", "as VGGISH_ALLOW_CPU_FALLBACK=1 allows", "all checks passed"], 0),
        (gpu_env({"fail": True}), ["nvidia-smi: no GPUs used: nvidia-smi --query-gpu", "CPU: embeds", "1 problem(s)"], 3),
    ],
    ids=["no-nvidia-smi", "gpu-tensorflow-cannot-see", "allowed-cpu-fallback", "failing-nvidia-smi"],
)
def test_doctor_says_what_each_device_would_do(model_files, env, lines, code):
    result = cli("worker", "doctor", "--checkpoint", str(model_files["checkpoint"]), env=env)
    assert result.returncode == code, result.stdout + result.stderr
    for line in lines:
        assert line in result.stdout, result.stdout
    assert "Traceback" not in result.stderr
