"""docker-compose.yml is valid and keeps its promises (checked without a Docker engine)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_compose_config_passes_and_pins_one_gpu_per_worker():
    if not shutil.which("docker-compose"):
        if os.environ.get("CI") == "true":
            pytest.fail("docker-compose is not installed")
        pytest.skip("docker-compose is not installed")
    result = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config"],
        capture_output=True, text=True, env={**os.environ, "REDIS_PASSWORD": "pw-for-test"},
    )
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    redis = config["services"]["redis"]
    assert "appendonly" in " ".join(redis["command"]) and "noeviction" in redis["command"]
    assert all(str(p.get("host_ip", p) if isinstance(p, dict) else p).startswith("127.0.0.1") for p in redis["ports"])
    workers = {k: v for k, v in config["services"].items() if k.startswith("worker-gpu")}
    ids = [v["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for v in workers.values()]
    assert sorted(ids) == [["0"], ["1"]]
    assert all("pw-for-test@redis" in v["environment"]["VGGISH_BROKER_URL"] for v in workers.values())
