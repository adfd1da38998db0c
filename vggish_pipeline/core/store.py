"""Where the pipeline's files are: a local path, or an object-store URL (s3://bucket/prefix/...).

A location is a `Path` (local) or a `UPath` (fsspec's, for a URL): both join with `/` and read
with read_bytes/open/stat, so code that only reads takes either. What differs, writes that must
never be torn, written once, or listed fresh, is here. fsspec picks the back end by the URL's
scheme (s3fs for s3://; gcs or azure where their package is installed). S3 credentials and the
endpoint come as the AWS tools take them (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE and
its config files, AWS_ENDPOINT_URL or AWS_ENDPOINT_URL_S3 for an S3-compatible store): never a
flag, and never in a message, since a location is only a bucket and a key.

On a store, a PUT is atomic (a reader sees the old object or the whole new one); a shard is
written once by a conditional PUT (If-None-Match: *). A store that ignores the header lets a later
copy replace the first; `check_writable` finds that out at start (README, "A bucket instead of a
shared folder").
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Union

from vggish_pipeline.core.errors import InputError, PipelineError, StoreError, redact, store_failure
from vggish_pipeline.core.files import atomic_write, create_bytes

if TYPE_CHECKING:
    from upath import UPath

Location = Union[Path, "UPath"]

PART_BYTES = 8 << 20  # a ranged read is split into parts this size, fetched at once (a 1,024-row chunk: 7 parts)
PARALLEL_PARTS = 8
URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(value: str | os.PathLike) -> bool:
    """A URL other than file:// (which stays a local path, as it always was)."""
    text = os.fspath(value) if isinstance(value, os.PathLike) else str(value)
    return bool(URL.match(text)) and not text.startswith("file://")


def location(value: str | os.PathLike | Location) -> Location:
    """`value` as a location: a UPath for a URL (its listings never cached: workers add shards
    while this process looks), else a Path. A location is returned as it is."""
    if not isinstance(value, str | os.PathLike):
        return value
    if isinstance(value, Path) or not is_url(value):
        return Path(value)
    from upath import UPath

    text = str(value)
    bucket, *keys = text.split("://", 1)[1].split("/")
    if not bucket or "::" in text or any(part in (".", "..") for part in keys):
        raise InputError(f"{text}: refused: a URL needs a bucket, and no '.', '..' or '::' (fsspec's chaining) in its path")
    try:
        return UPath(text.rstrip("/"), use_listings_cache=False)
    except (ValueError, TypeError, ImportError) as e:  # a scheme no installed fsspec back end serves
        raise InputError(f"{text}: {e}") from e


def roots(text: str) -> list[Location]:
    """Locations separated by ':' (as PATH is), a URL's own '://' kept: "/data:s3://bucket/jobs"."""
    return [location(part) for part in re.split(r":(?!//)", text) if part]


def read(loc: Location) -> bytes:
    """A whole small file: on a store one GET, which returns one version of the object whole (a
    buffered UPath read checks the ETag between its reads, and fails if the object is replaced)."""
    return loc.read_bytes() if isinstance(loc, Path) else loc.fs.cat_file(loc.path)


def opened(loc: Location) -> Path | IO[bytes]:
    """What a reader of a whole small file (np.load of a shard, PCA params) takes: a local path, or the object fetched in one GET."""
    return loc if isinstance(loc, Path) else io.BytesIO(read(loc))


def remote(loc: Location) -> bool:
    return not isinstance(loc, Path)


def local(loc: Location, why: str) -> Path:
    """`loc` as a local path; a URL is one line saying what needs a local file."""
    if isinstance(loc, Path):
        return loc
    raise InputError(f"{loc}: {why} needs a local path, not a URL")


def resolved(loc: Location) -> Location:
    """A local path with symlinks and '..' resolved; a URL as it is (location() refused '..')."""
    return Path(os.path.realpath(loc)) if isinstance(loc, Path) else loc


def within(loc: Location, root: Location) -> bool:
    """Whether resolved `loc` is `root` or lies under it: a folder, or a bucket and prefix."""
    if isinstance(loc, Path) or isinstance(root, Path):
        return isinstance(loc, Path) and isinstance(root, Path) and loc.is_relative_to(root)
    here, top = named(loc), named(root)
    return here == top or here.startswith(top + "/")


def named(loc: Location) -> str:
    """A location as text, without a trailing '/' (UPath writes a bucket as s3://bucket/)."""
    return str(loc) if isinstance(loc, Path) else str(loc).rstrip("/")


def names(folder: Location) -> set[str]:
    """The names in `folder` now: one listing (on a store, never a cached one); none if it is not there."""
    try:
        if isinstance(folder, Path):
            return set(os.listdir(folder))
        return {entry.rstrip("/").rsplit("/", 1)[-1] for entry in folder.fs.ls(folder.path, detail=False, refresh=True)}
    except (FileNotFoundError, NotADirectoryError):
        return set()


def read_into(loc: Location, offset: int, buffer: memoryview) -> int:
    """Read bytes [offset, offset + len(buffer)) of `loc` into `buffer`, and no others: on a store,
    ranged GETs of at most PART_BYTES, up to PARALLEL_PARTS at once (s3fs retries a transient error).
    Returns how many bytes there were (fewer at the end of the file)."""
    size = len(buffer)
    if isinstance(loc, Path):
        with open(loc, "rb", buffering=0) as f:
            f.seek(offset)
            got = 0
            while got < size:  # a short read is allowed; only the end of the file stops it
                more = f.readinto(buffer[got:])
                if not more:
                    break
                got += more
        return got
    starts = list(range(0, size, PART_BYTES))
    ends = [min(s + PART_BYTES, size) for s in starts]
    try:
        parts = loc.fs.cat_ranges([loc.path] * len(starts), [offset + s for s in starts], [offset + e for e in ends],
                                  max_gap=None, batch_size=PARALLEL_PARTS, on_error="raise")
    except OSError as e:  # a part past the end (416, as EINVAL): read only what the object holds, as a file would
        if e.errno != errno.EINVAL:
            raise
        there = max(0, loc.fs.info(loc.path, refresh=True)["size"] - offset)
        return read_into(loc, offset, buffer[:there]) if there < size else 0
    got = 0
    for start, part in zip(starts, parts, strict=True):
        buffer[start : start + len(part)] = part
        got += len(part)
        if len(part) < PART_BYTES and start + len(part) < size:
            break
    return got


def write(loc: Location, data: bytes) -> None:
    """Replace `loc` whole: a reader sees the old file or the new one."""
    if isinstance(loc, Path):
        with atomic_write(loc) as f:
            f.write(data)
    else:
        loc.fs.pipe_file(loc.path, data)


def create(loc: Location, data: bytes) -> bool:
    """Write `loc` only if nothing is there yet, not even something written meanwhile; True if
    this call created it. On a store, a conditional PUT: the store decides, so two workers racing
    for one shard cannot both win."""
    if isinstance(loc, Path):
        return create_bytes(loc, data)
    try:
        loc.fs.pipe_file(loc.path, data, mode="create")
    except FileExistsError:
        return False
    return True


def remove(loc: Location) -> None:
    """Remove `loc`; nothing if it is gone already."""
    with contextlib.suppress(FileNotFoundError):
        if isinstance(loc, Path):
            loc.unlink()
        else:
            loc.fs.rm_file(loc.path)


def check_writable(folder: Location) -> bool:
    """Refuse, in one line and before anything is written, a folder or prefix this process cannot
    write. Returns whether it honours a write-once (`create`): a store that ignores If-None-Match
    lets a second PUT replace the first."""
    if isinstance(folder, Path):
        if folder.exists() and not folder.is_dir():
            raise InputError(f"{folder}: is a file, expected an output folder")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"{folder}: cannot create output folder ({e.strerror})") from e
        try:
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as e:
            raise InputError(f"{folder}: output folder is not writable ({e.strerror})") from e
        return True
    probe = folder / ".write-probe"  # one name: a process killed mid-probe leaves one, which the next removes
    with reporting(folder):
        try:
            create(probe, b"")
            return not create(probe, b"")  # whoever made it, a store that honours If-None-Match refuses this one
        finally:
            remove(probe)


def check_bucket(root: Location) -> None:
    """Refuse, in one line, a prefix whose bucket is missing, whose credentials are wrong, or whose
    store does not answer (a HEAD of the bucket); a local root is checked by its caller."""
    if isinstance(root, Path):
        return
    with reporting(root):
        root.fs.info(named(root).split("://", 1)[1].split("/")[0], refresh=True)


@contextlib.contextmanager
def reporting(loc: Location) -> Iterator[None]:
    """Turn an OS failure or a store client's error in the block into one line naming `loc`; the
    project's errors pass as they are, and any other exception (a bug) keeps its traceback."""
    try:
        yield
    except PipelineError:
        raise
    except Exception as e:
        if not isinstance(e, OSError) and store_failure(e) is None:
            raise
        raise failure(loc, e) from e


def failure(loc: Location, e: BaseException) -> PipelineError:
    """An OS failure or a store's refusal as one line naming the location (never a credential: the
    message is the store's reason, any URL in it redacted)."""
    if isinstance(e, PipelineError):
        return e
    if isinstance(loc, Path):
        return PipelineError(f"{loc}: {e.strerror if isinstance(e, OSError) and e.strerror else e}")
    reasons: dict[type, str] = {FileNotFoundError: "no such bucket or key",
                                PermissionError: "access denied (credentials or the bucket's policy)"}
    reason = reasons.get(type(e))
    detail = redact(str(e).splitlines()[0]) if str(e) else type(e).__name__
    return StoreError(f"{loc}: {reason + ' - ' if reason else ''}{detail}")


def upload(local: Path, loc: UPath, threads: int = PARALLEL_PARTS) -> str:
    """Copy a local file to `loc` (multipart for a large one, parts in parallel): the object
    appears whole, at the end. Returns its ETag, which names this content of it."""
    loc.fs.put_file(str(local), loc.path, max_concurrency=threads)
    return etag(loc)


def etag(loc: UPath) -> str:
    """The store's tag of the object's content now (asked afresh)."""
    return str(loc.fs.info(loc.path, refresh=True).get("ETag"))

