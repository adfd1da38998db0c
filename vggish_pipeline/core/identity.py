"""Which model a job is pinned to, without TensorFlow: a checkpoint's files, the digest of their
bytes, and the model id (that digest, marked when TF32 computes it)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from vggish_pipeline.core import store
from vggish_pipeline.core.errors import CheckpointError
from vggish_pipeline.core.files import atomic_write, write_json
from vggish_pipeline.core.store import Location

if TYPE_CHECKING:
    from upath import UPath


def checkpoint_files(path: Path) -> list[Path]:
    """The files that make up a checkpoint: the file itself (V1), or PREFIX.index and PREFIX.data-* (V2)."""
    if path.suffix == ".index":
        path = path.with_suffix("")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory; give the checkpoint file, e.g. vggish_model.ckpt")
    if path.is_file():
        return [path]
    index = path.with_name(path.name + ".index")
    if index.is_file():
        return [index, *sorted(path.parent.glob(path.name + ".data-*"))]
    raise CheckpointError(f"{path}: no such checkpoint")


def local_checkpoint(loc: Location, cache_dir: Path) -> Path:
    """The checkpoint on this machine: a local one as it is; one on a store (its V1 file, or its
    .index and .data-* objects) copied into the cache once, and again only when an object's ETag
    or size changes; the workers of one machine starting together copy it once, in turn (a lock).
    A missing or unreadable one is one CheckpointError line."""
    if isinstance(loc, Path):
        return loc
    prefix = loc.with_suffix("") if loc.suffix == ".index" else loc
    folder = cache_dir / "checkpoints" / hashlib.sha256(str(prefix.parent).encode()).hexdigest()[:16]
    with store.reporting(loc):
        present = store.names(prefix.parent)
        wanted = [prefix.name] if prefix.name in present else sorted(
            n for n in present if n == prefix.name + ".index" or n.startswith(prefix.name + ".data-"))
        if not any(n == prefix.name or n.endswith(".index") for n in wanted):
            raise CheckpointError(f"{loc}: no such checkpoint")
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released if this process dies
            for name in wanted:
                fetch(prefix.parent / name, folder / name)
    return folder / prefix.name


def fetch(remote: UPath, local: Path, attempts: int = 3) -> None:
    """Copy an object to `local` in parts, unless the copy there has its ETag and size already;
    a copy during which the object was replaced (its ETag changed) is made again."""
    tag = local.with_name(f".{local.name}.etag")
    for _ in range(attempts):
        info = remote.fs.info(remote.path, refresh=True)
        key = f"{info.get('ETag')}:{info['size']}"
        if local.exists() and tag.exists() and tag.read_text() == key:
            return
        with atomic_write(local) as f:
            for start in range(0, info["size"], store.PART_BYTES):
                f.write(remote.fs.cat_file(remote.path, start=start, end=min(start + store.PART_BYTES, info["size"])))
        if store.etag(remote) == str(info.get("ETag")):
            tag.write_text(key)
            return
    raise CheckpointError(f"{remote}: replaced while it was copied, {attempts} times")


def checkpoint_prefix(path: Path) -> Path:
    """What TensorFlow's readers take: the V1 file itself, or the V2 PREFIX."""
    first = checkpoint_files(path)[0]
    return first.with_suffix("") if first.suffix == ".index" else first


FINGERPRINTS_KEPT = 64

def model_id(digest: str, tf32: bool) -> str:
    """What a job is pinned to: the checkpoint's digest, marked when TF32 (not float32) computes
    it, so that no job mixes the two precisions."""
    return f"{digest}+tf32" if tf32 else digest


def fingerprint(path: Path, cache_dir: Path) -> str:
    """A digest of the checkpoint's bytes: two jobs share shards only when this matches.

    Hashing 288 MB costs 0.3-0.9 s on every producer and worker start, so digests are remembered
    in a small cache keyed by each file's identity: path, device, inode, size, mtime and ctime
    (which no one can set back by hand, so rewriting a file in place changes the key).
    """
    files = checkpoint_files(path)
    key = ";".join(f"{os.path.realpath(f)}:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
                   for f, st in ((f, f.stat()) for f in files))
    cache = cache_dir / "fingerprints.json"
    known = read_cache(cache)
    if key in known:
        return known[key]
    h = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
    digest = h.hexdigest()[:16]
    known = {**read_cache(cache), key: digest}  # another process may have added its own meanwhile
    with contextlib.suppress(OSError):  # a read-only home only costs the hash next time
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_json(cache, dict(list(known.items())[-FINGERPRINTS_KEPT:]))
    return digest


def read_cache(path: Path) -> dict[str, str]:
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}
