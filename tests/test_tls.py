"""A broker over TLS with an ACL password, as a deployment across machines runs it: a CA the test
makes, Redis with TLS only (scripts/redis-with-acl), a worker and a producer on rediss:// with
--broker-ca / VGGISH_BROKER_CA, and the ways it fails at start, each one line."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from conftest import acl_redis_server, cli, free_port, merged_env
from outputs import check_outputs
from pki import make_ca, make_server_cert, tls_redis


@pytest.fixture
def tls_broker(tmp_path):
    binary = tls_redis()
    pki = tmp_path / "pki"
    pki.mkdir()
    ca = make_ca(pki, "ca")
    other_ca = make_ca(pki, "other-ca")
    cert, key = make_server_cert(pki, "ca", "127.0.0.1")
    port = free_port()
    args = ["--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--tls-cert-file", str(cert), "--tls-key-file", str(key),
            "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)]
    with acl_redis_server(binary, tmp_path, port, *args) as server:
        yield {"url": f"rediss://vggish@127.0.0.1:{port}/0", "ca": ca, "other_ca": other_ca, **server}


def test_a_job_runs_over_tls_with_a_password_and_bad_setups_fail_in_one_line(tls_broker, sample, model_files, expected, tmp_path):
    env = {"VGGISH_BROKER_PASSWORD_FILE": str(tls_broker["secret"]), "VGGISH_BROKER_URL": None, "VGGISH_BROKER_CA": None}
    worker = subprocess.Popen(
        [sys.executable, "-m", "worker", "start", "--broker", tls_broker["url"], "--broker-ca", str(tls_broker["ca"]),
         "--checkpoint", str(model_files["checkpoint"]), "--cpu", "--threads", "1", "--name", "tls@test", "--data-root", str(sample["dir"])],
        env=merged_env(env), stdout=subprocess.DEVNULL, stderr=open(tmp_path / "w.log", "wb"),
    )
    try:
        producer_env = {**env, "VGGISH_BROKER_URL": tls_broker["url"], "VGGISH_BROKER_CA": str(tls_broker["ca"])}  # the env fallbacks
        deadline = time.monotonic() + 180
        while cli("worker", "ping", "tls@test", env=producer_env).returncode != 0:
            assert time.monotonic() < deadline and worker.poll() is None, (tmp_path / "w.log").read_text()
        assert cli("producer", "enqueue", str(sample["spec"]), "--chunk-rows", "50", env=producer_env).returncode == 0
        waited = cli("producer", "wait", str(sample["dir"]), "--timeout", "300", env=producer_env)
        assert waited.returncode == 0, waited.stderr
        assert cli("producer", "finalize", str(sample["dir"])).returncode == 0
        check_outputs(sample["dir"], sample["csv"], expected["relu"])
    finally:
        worker.terminate()
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()

    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password\n")
    failures = {
        "untrusted certificate": ({**env, "VGGISH_BROKER_CA": str(tls_broker["other_ca"])}, tls_broker["url"], "certificate verify failed"),
        "closed port": ({**env, "VGGISH_BROKER_CA": str(tls_broker["ca"])}, f"rediss://vggish@127.0.0.1:{free_port()}/0", "refused"),
        "wrong password": ({**env, "VGGISH_BROKER_CA": str(tls_broker["ca"]), "VGGISH_BROKER_PASSWORD_FILE": str(wrong)}, tls_broker["url"],
                           "invalid username-password"),
    }
    for case, (case_env, url, says) in failures.items():
        refused = cli("producer", "status", str(sample["dir"]), "--broker", url, env=case_env)
        assert refused.returncode == 3, (case, refused.stderr)
        line = refused.stderr
        assert line.count("\n") == 1 and says in line.lower(), (case, line)
        assert tls_broker["password"] not in line and "not-the-password" not in line
