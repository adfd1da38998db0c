"""Hosts for tests, as network namespaces on one LAN: a switch (a bridge) in the broker's namespace,
and one veth cable from it to each other host. With a shared folder, every host sees it at the same
path, as an NFS or cluster file system appears on every node; the test's own namespace sees only an
empty folder there. Without one, hosts share only what goes over the LAN (a broker, a bucket). Addresses are used only inside the namespaces. Needs root (CI runs as root)."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

SUBNET = "10.77.0"  # a /24 that exists only inside these namespaces
BROKER_ADDRESS = f"{SUBNET}.1"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class Lan:
    """`broker` holds the switch and BROKER_ADDRESS; `add(name)` cables another host to it."""

    def __init__(self, shared: Path | None, mountpoint: Path | None) -> None:
        self.tag = secrets.token_hex(3)  # names unique to this test run: several runs may share a kernel
        self.shared = shared
        self.mountpoint = mountpoint
        self.hosts: dict[str, str] = {}  # host name -> namespace
        self.ports: dict[str, str] = {}  # host name -> its cable's end on the switch
        self.broker = f"vgg-{self.tag}-broker"

    def start(self) -> None:
        self._namespace("broker")
        ip("-n", self.broker, "link", "add", "sw", "type", "bridge")
        ip("-n", self.broker, "addr", "add", f"{BROKER_ADDRESS}/24", "dev", "sw")
        ip("-n", self.broker, "link", "set", "sw", "up")

    def _namespace(self, name: str) -> str:
        namespace = f"vgg-{self.tag}-{name}"
        ip("netns", "add", namespace)
        self.hosts[name] = namespace
        ip("-n", namespace, "link", "set", "lo", "up")
        return namespace

    def add(self, name: str) -> str:
        """A host cabled to the switch; returns its address."""
        namespace = self._namespace(name)
        address = f"{SUBNET}.{len(self.hosts)}"
        port = f"p{len(self.hosts)}"
        ip("link", "add", port, "netns", self.broker, "type", "veth", "peer", "name", "eth0", "netns", namespace)
        ip("-n", self.broker, "link", "set", port, "master", "sw", "up")
        ip("-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
        ip("-n", namespace, "link", "set", "eth0", "up")
        self.ports[name] = port
        return address

    def command(self, host: str, *args: str) -> list[str]:
        """`args` run on `host`: in its namespace, with the shared folder mounted at the mountpoint
        (`ip netns exec` gives each command a mount namespace of its own, so the mount stays there);
        a LAN without a shared folder mounts nothing."""
        if self.shared is None:
            return ["ip", "netns", "exec", self.hosts[host], *args]
        mount = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'
        return ["ip", "netns", "exec", self.hosts[host], "sh", "-c", mount, "sh", str(self.shared), str(self.mountpoint), *args]

    def cut(self, host: str) -> None:
        """Pull `host`'s cable out of the switch: its packets vanish without a word, as on a real LAN."""
        ip("-n", self.broker, "link", "set", self.ports[host], "down")

    def restore(self, host: str) -> None:
        ip("-n", self.broker, "link", "set", self.ports[host], "up")

    def close(self) -> None:
        for namespace in self.hosts.values():
            for pid in subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), 9)
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)  # takes its cables with it


@contextlib.contextmanager
def lan(shared: Path | None = None, mountpoint: Path | None = None) -> Iterator[Lan]:
    """A LAN for one test, taken down after it, processes and all, however the test ends."""
    network = Lan(shared, mountpoint)
    try:
        network.start()
        yield network
    finally:
        network.close()
