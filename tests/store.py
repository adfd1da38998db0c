"""A real S3-compatible server for tests: moto's, as its own process on a port (on this host, or on a
namespace host), enforcing credentials. Its one user, made by the test with fresh keys, may do
anything except touch `BUCKET/locked/`: a denied prefix, as a bucket policy makes one."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

SETUP_ACTIONS = 3  # create the user, its key and its policy: then moto asks every request for credentials
DENIED = "locked"


def aws_env(endpoint: str, key: str, secret: str) -> dict[str, str]:
    """The environment the AWS tools (and s3fs) take a store from; no config files of this machine's."""
    return {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret, "AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


@contextlib.contextmanager
def moto_server(address: str, port: int, on: Callable[..., list[str]] | None = None) -> Iterator[dict]:
    """moto's server on `address`:`port` (on another host: `on`), killed after; yields its
    endpoint and the environment of its user (env), whose keys are the test's own."""
    on = on or (lambda *command: list(command))
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(SETUP_ACTIONS)}
    proc = subprocess.Popen(on(sys.executable, "-m", "moto.server", "-H", address, "-p", str(port)), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://{address}:{port}"
    setup = f"""
import json, socket, sys, time, boto3
while True:
    try:
        socket.create_connection(({address!r}, {port}), 0.5).close(); break
    except OSError:
        time.sleep(0.05)
iam = boto3.client("iam", endpoint_url={endpoint!r}, region_name="us-east-1", aws_access_key_id="setup", aws_secret_access_key="setup")
iam.create_user(UserName="pipeline")
key = iam.create_access_key(UserName="pipeline")["AccessKey"]
policy = {{"Version": "2012-10-17", "Statement": [
    {{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}},
    {{"Effect": "Deny", "Action": "s3:*", "Resource": "arn:aws:s3:::*/{DENIED}/*"}}]}}
iam.put_user_policy(UserName="pipeline", PolicyName="all-but-locked", PolicyDocument=json.dumps(policy))
print(json.dumps([key["AccessKeyId"], key["SecretAccessKey"]]))
"""
    try:
        made = subprocess.run(on(sys.executable, "-c", setup), capture_output=True, text=True, timeout=60)
        assert made.returncode == 0 and proc.poll() is None, f"moto server did not start: {made.stderr[-2000:]}"
        key, secret = json.loads(made.stdout)
        yield {"endpoint": endpoint, "env": aws_env(endpoint, key, secret), "secret": secret, "pid": proc.pid}
    finally:
        proc.kill()
        proc.wait()


class Bucket:
    """A fresh bucket on the server, through s3fs as the test's own client."""

    def __init__(self, env: dict[str, str]) -> None:
        import s3fs

        self.name = f"t-{secrets.token_hex(4)}"
        self.url = f"s3://{self.name}"
        self.fs = s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"],
                                    endpoint_url=env["AWS_ENDPOINT_URL"], skip_instance_cache=True, use_listings_cache=False)
        self.fs.mkdir(self.name)

    def put(self, local: Path, key: str) -> str:
        self.fs.put_file(str(local), f"{self.name}/{key}")
        return f"{self.url}/{key}"

    def get(self, key: str, local: Path) -> Path:
        self.fs.get_file(f"{self.name}/{key}", str(local))
        return local

    def keys(self, prefix: str) -> list[str]:
        return sorted(p.split("/", 1)[1] for p in self.fs.find(f"{self.name}/{prefix}"))


@contextlib.contextmanager
def s3rver(binary: str, data: Path, port: int) -> Iterator[dict]:
    """s3rver (npm), an S3-compatible server that keeps objects in files and ignores If-None-Match:
    the store without conditional writes. Its credentials are its fixed defaults."""
    import socket
    import time

    data.mkdir(exist_ok=True)
    proc = subprocess.Popen([binary, "-d", str(data), "-a", "127.0.0.1", "-p", str(port), "--silent"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "s3rver did not start"
                time.sleep(0.05)
        yield {"env": aws_env(f"http://127.0.0.1:{port}", "S3RVER", "S3RVER")}
    finally:
        proc.kill()
        proc.wait()
