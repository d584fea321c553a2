"""Snapshots in shared object storage, for several daemons (one per node): the truth lives here, each node's
SnapshotStore (store.py) is a cache of it.

The layout under the store's root (`file:///dir`, a shared volume; or `s3://bucket/prefix`):

    snapshots/<id>/<file>           the snapshot's files, as in its directory of a node's store
    snapshots/<id>/manifest.json    its record (store.py's manifest: every file's size and sha256), put LAST

A snapshot without a manifest is half written (or half deleted) and invisible: the manifest goes after every file
(put-if-absent where the store has it) and is deleted first. No SQLite here: its WAL does not work over a network
file system. Files stream both ways (multipart uploads, chunked downloads) and are hashed on the way: a pushed
file that no longer matches its record is never published, and a fetched object that differs from the manifest
is refused, naming its key.

obstore (the `cluster` extra) is imported when a store is opened, never by the daemon without one.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import re
import stat
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from snapkernel.errors import (
    BackendUnavailableError,
    InvalidSpecError,
    NotFoundError,
    SnapkernelError,
    SnapshotCorruptError,
    StateError,
)
from snapkernel.protocol.kinds import check_snapshot_kind
from snapkernel.protocol.spec import check_snapshot_id
from snapkernel.snapshots.store import (
    MANIFEST,
    Snapshot,
    SnapshotFile,
    SnapshotStore,
    is_disk_full,
    manifest_json,
    snapshot_from_json,
)

if TYPE_CHECKING:
    from obstore.store import ObjectStore

log = logging.getLogger(__name__)

ROOT = "snapshots"
ACCEPTED = ("file:///absolute/dir (a directory every node mounts) or s3://bucket/prefix (credentials, region and "
            "endpoint from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION or "
            "AWS_DEFAULT_REGION, AWS_ENDPOINT_URL)")
CHUNK = 8 * 1024**2  # bytes read, hashed and sent at a time; files up to this size go in one request
MAX_PARTS = 9000  # S3 allows 10,000 parts per upload: big files get bigger parts
UPLOAD_CONCURRENCY = 4  # parts in flight per file (each CHUNK or more in memory)
_ENV = {"access_key_id": "AWS_ACCESS_KEY_ID", "secret_access_key": "AWS_SECRET_ACCESS_KEY",
        "session_token": "AWS_SESSION_TOKEN"}
_UNREACHABLE = ("error sending request", "tcp connect error", "connection refused", "dns error", "timed out",
                "connection reset", "operation timed out")
_CREDENTIALS = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "InvalidSecurity")


@dataclass(frozen=True)
class StoreURL:
    url: str
    scheme: str  # "file" or "s3"
    path: str = ""  # file: the directory
    bucket: str = ""  # s3
    prefix: str = ""  # s3: "" or "a/b"


def _bad(url: str, why: str) -> InvalidSpecError:
    return InvalidSpecError(f"snapshot_store {url!r} is not valid: {why}; use {ACCEPTED}")


def bucket_problem(name: str) -> str:
    """What breaks S3's bucket naming rules in `name` ("" when nothing does)."""
    if not 3 <= len(name) <= 63:
        return f"it has {len(name)} characters, not 3 to 63"
    if not re.fullmatch(r"[a-z0-9.-]+", name):
        return "only lowercase letters, digits, '.' and '-' are allowed"
    if not (name[0].isalnum() and name[-1].isalnum()):
        return "it must start and end with a letter or digit"
    if ".." in name:
        return "it has two periods in a row"
    try:
        ipaddress.IPv4Address(name)
        return "it is formatted as an IP address"
    except ValueError:
        pass
    for start in ("xn--", "sthree-", "amzn-s3-demo-"):
        if name.startswith(start):
            return f"names starting {start!r} are reserved"
    for end in ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3"):
        if name.endswith(end):
            return f"names ending {end!r} are reserved"
    return ""


def parse_url(url: str) -> StoreURL:
    """The parts of a `snapshot_store` URL; InvalidSpecError naming it and what is accepted otherwise."""
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        raise _bad(url, "it has a query or fragment")
    if parts.scheme == "file":
        path = unquote(parts.path)
        if parts.netloc not in ("", "localhost") or not path.startswith("/"):
            raise _bad(url, "the directory must be an absolute path, as in file:///srv/snapshots")
        return StoreURL(url, "file", path=os.path.normpath(path))
    if parts.scheme == "s3":
        bucket = parts.netloc
        if not bucket:
            raise _bad(url, "it names no bucket")
        why = bucket_problem(bucket)
        if why:
            raise _bad(url, f"bucket name {bucket!r} breaks S3's naming rules: {why}")
        prefix = parts.path.strip("/")
        segments = prefix.split("/") if prefix else []
        if any(s in ("", ".", "..") or not s.isprintable() for s in segments):
            raise _bad(url, f"prefix {prefix!r} has an empty, '.' or '..' part or a control character")
        return StoreURL(url, "s3", bucket=bucket, prefix=prefix)
    raise _bad(url, f"scheme {parts.scheme + '://' if parts.scheme else '(none)'} is not supported")


def _summary(e: BaseException) -> str:
    """obstore's message without its debug dump, with the server's own error code and message."""
    text = str(e).split("\n\nDebug source:")[0]
    code = re.search(r"<Code>([^<]*)</Code>", text)
    message = re.search(r"<Message>([^<]*)</Message>", text)
    text = re.sub(r"<\?xml.*", "", text, flags=re.S).strip().rstrip(":")
    text = re.sub(r" in [\d.]+[µmn]?s\b", "", text.removeprefix("Generic S3 error: "))  # how long it took
    if code:
        text += f": {code[1]}" + (f": {message[1]}" if message else "")
    return text[:800]


def _check_name(snapshot_id: str, name: str) -> str:
    """A snapshot's file name that is safe as a key and as a path below a directory (names come from a manifest
    anyone with write access to the store could have written)."""
    parts = name.split("/")
    if (name == MANIFEST or name.startswith("/") or any(p in ("", ".", "..") for p in parts)
            or not name.isprintable()):
        raise SnapshotCorruptError(f"snapshot {snapshot_id} lists a file named {name!r}: not a name a shared "
                                   "store takes (a relative path, no '.', '..' or empty parts, no control "
                                   f"characters, not {MANIFEST})")
    return name


def _part_size(size: int) -> int:
    return max(CHUNK, -(-size // MAX_PARTS))


class SharedStore:
    """The snapshots of a shared object store (`open` one from its URL). Calls block: the daemon runs them in
    worker threads."""

    def __init__(self, store: ObjectStore, where: StoreURL, endpoint: str = "") -> None:
        self.store = store
        self.where = where
        self.url = where.url
        self.endpoint = endpoint  # s3: the endpoint's URL ("" for AWS)
        self._manifests: dict[tuple[str, str], Snapshot] = {}  # list(): manifests are never changed, only deleted

    def __repr__(self) -> str:
        return f"SharedStore({self.url!r})"

    @property
    def name(self) -> str:
        return f"shared snapshot store {self.url}"

    @classmethod
    def open(cls, url: str, env: Mapping[str, str] | None = None) -> SharedStore:
        """The store at `url`, checked at once with one listing request: a bad URL, a missing directory or
        bucket, wrong credentials or an endpoint that does not answer raise here, naming the value."""
        where = parse_url(url)
        env = os.environ if env is None else env
        try:
            from obstore.store import LocalStore, S3Store
        except ImportError as e:
            raise InvalidSpecError(f"snapshot_store {url!r} needs obstore: install snapkernel with its `cluster` "
                                   "extra (pip install 'snapkernel[cluster]')") from e
        endpoint = ""
        store: ObjectStore
        if where.scheme == "file":
            directory = Path(where.path)
            if not directory.is_dir():
                raise InvalidSpecError(f"snapshot_store {url!r}: {directory} is not a directory; create it (the "
                                       "mount point of a volume every node shares) or name another")
            if not os.access(directory, os.W_OK | os.X_OK):
                raise InvalidSpecError(f"snapshot_store {url!r}: {directory} is not writable by this daemon")
            store = LocalStore(directory, automatic_cleanup=True)
        else:
            endpoint = env.get("AWS_ENDPOINT_URL", "")
            if endpoint and not re.match(r"https?://[^/]", endpoint):
                raise InvalidSpecError(f"AWS_ENDPOINT_URL {endpoint!r} (for snapshot_store {url!r}) is not valid: "
                                       "give http://HOST:PORT or https://HOST")
            config: dict[str, Any] = {k: env[v] for k, v in _ENV.items() if env.get(v)}
            config["region"] = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
            if endpoint:
                config["endpoint"] = endpoint
            try:
                store = S3Store(
                    where.bucket, prefix=where.prefix or None, config=config,  # type: ignore[arg-type]
                    # The whole request may take long (a big file's GET); a stalled one is cut by read_timeout.
                    client_options={"allow_http": endpoint.startswith("http://"), "connect_timeout": "5s",
                                    "timeout": "12h", "read_timeout": "120s"},
                    retry_config={"max_retries": 3, "retry_timeout": timedelta(seconds=30)},
                )
            except Exception as e:  # obstore's configuration errors: a region or endpoint it does not take
                raise InvalidSpecError(f"snapshot_store {url!r}: {_summary(e)}") from e
        shared = cls(store, where, endpoint)
        shared.probe()
        return shared

    def probe(self) -> None:
        """One cheap real request (the first page of a listing), so that a store that cannot work fails now."""
        import obstore

        try:
            next(iter(obstore.list(self.store, f"{ROOT}/", chunk_size=1)), None)
        except Exception as e:
            raise self._fail(e, "listing its snapshots", at_open=True) from e

    # --- errors ---------------------------------------------------------------------------------
    def _at(self) -> str:
        if self.where.scheme != "s3":
            return ""
        return f" at {self.endpoint}" if self.endpoint else " at AWS S3"

    def _fail(self, e: BaseException, doing: str, at_open: bool = False) -> SnapkernelError:
        """The snapkernel error for an obstore failure: what was being done, where, and what to check."""
        from obstore.exceptions import PermissionDeniedError, UnauthenticatedError

        if isinstance(e, SnapkernelError):
            return e
        text, summary = str(e), _summary(e)
        config_error = InvalidSpecError if at_open else BackendUnavailableError
        if any(s in text.lower() for s in _UNREACHABLE):
            return BackendUnavailableError(
                f"cannot reach the {self.name}{self._at()} ({doing}): {summary}; check the endpoint "
                "(AWS_ENDPOINT_URL) and that the server runs")
        if any(c in text for c in _CREDENTIALS) or isinstance(e, UnauthenticatedError):
            return config_error(f"wrong credentials for {self.url}{self._at()} ({doing}): {summary}; check "
                                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN)")
        if "NoSuchBucket" in text:
            return config_error(f"bucket {self.where.bucket!r} of {self.url} does not exist{self._at()}: "
                                "create it or name another")
        if isinstance(e, PermissionDeniedError) or "403 Forbidden" in text or "AccessDenied" in text:
            return config_error(f"the {self.name}{self._at()} refused {doing}: {summary}; check that "
                                "AWS_ACCESS_KEY_ID's user may read, write and delete under it")
        if isinstance(e, OSError) and is_disk_full(e):  # a local volume that is full
            return config_error(f"the {self.name} is full ({doing}): {e}")
        return config_error(f"the {self.name}{self._at()} failed {doing}: {summary}")

    # --- keys -----------------------------------------------------------------------------------
    @staticmethod
    def key(snapshot_id: str, name: str = MANIFEST) -> str:
        return f"{ROOT}/{check_snapshot_id(snapshot_id)}/{name}"

    # --- reading --------------------------------------------------------------------------------
    def _read_manifest(self, snapshot_id: str) -> bytes | None:
        """The manifest's bytes, or None when the snapshot has none (absent, half written or half deleted)."""
        import obstore

        try:
            return bytes(obstore.get(self.store, self.key(snapshot_id)).bytes())
        except FileNotFoundError:
            return None
        except Exception as e:
            raise self._fail(e, f"reading {self.key(snapshot_id)}") from e

    def _parse(self, snapshot_id: str, body: bytes) -> Snapshot:
        try:
            snap = snapshot_from_json(body)
            if snap.id != snapshot_id:
                raise ValueError(f"it names {snap.id!r}")
            check_snapshot_kind(snap.kind)
        except (ValueError, TypeError, KeyError, AttributeError, SnapkernelError) as e:
            raise SnapshotCorruptError(f"{self.name}: {self.key(snapshot_id)} is not a snapshot's record "
                                       f"({type(e).__name__}: {e}); it will not be restored") from e
        for f in snap.files:
            _check_name(snapshot_id, f.name)
        return snap

    def get(self, snapshot_id: str) -> Snapshot:
        """The snapshot's record, from its manifest; NotFoundError when it has none."""
        found = self._read_manifest(snapshot_id)
        if found is None:
            raise NotFoundError(f"no snapshot {snapshot_id!r} here or in the {self.name}; `snapkernel snapshots "
                                "list` shows them")
        return self._parse(snapshot_id, found)

    def list(self) -> list[Snapshot]:
        """Every snapshot with a manifest, newest first; one whose manifest cannot be read is listed with
        `damaged` saying why."""
        import obstore

        found: dict[str, str] = {}
        try:
            for batch in obstore.list(self.store, f"{ROOT}/", chunk_size=1000):
                for meta in batch:
                    parts = meta["path"].split("/")
                    if len(parts) == 3 and parts[2] == MANIFEST:
                        found[parts[1]] = str(meta.get("e_tag") or meta["last_modified"])
        except Exception as e:
            raise self._fail(e, "listing its snapshots") from e
        self._manifests = {k: v for k, v in self._manifests.items() if found.get(k[0]) == k[1]}
        snaps = []
        for snapshot_id, tag in found.items():
            try:
                check_snapshot_id(snapshot_id)
            except InvalidSpecError:
                log.warning("%s: ignoring %s/%s/: not a snapshot id", self.name, ROOT, snapshot_id)
                continue
            snap = self._manifests.get((snapshot_id, tag))
            if snap is None:
                try:
                    read = self._read_manifest(snapshot_id)
                    if read is None:
                        continue  # deleted since the listing
                    snap = self._parse(snapshot_id, read)
                    self._manifests[(snapshot_id, tag)] = snap
                except SnapshotCorruptError as e:
                    snap = Snapshot(id=snapshot_id, kind="", damaged=str(e)[:500])
            snaps.append(snap)
        return sorted(snaps, key=lambda s: s.created, reverse=True)

    def read_file(self, snap: Snapshot, name: str, limit: int = 4 * 1024**2) -> bytes:
        """One small file of a snapshot, checked against its manifest (a memory snapshot's kernel key, say)."""
        import obstore

        f = next((f for f in snap.files if f.name == name), None)
        if f is None:
            raise NotFoundError(f"snapshot {snap.id} has no file {name}")
        if f.size > limit:
            raise StateError(f"snapshot {snap.id}: file {name} has {f.size} bytes, more than {limit} read at once")
        key = self.key(snap.id, name)
        try:
            data = bytes(obstore.get(self.store, key).bytes())
        except FileNotFoundError:
            raise self._missing(snap, f) from None
        except Exception as e:
            raise self._fail(e, f"reading {key}") from e
        actual = hashlib.sha256(data).hexdigest()
        if actual != f.sha256:
            raise self._corrupt(snap.id, f, len(data), actual)
        return data

    def _missing(self, snap: Snapshot, f: SnapshotFile) -> SnapshotCorruptError:
        return SnapshotCorruptError(f"{self.name}: object {self.key(snap.id, f.name)} is missing (snapshot "
                                    f"{snap.id}'s manifest lists it, {f.size} bytes); the snapshot will not be "
                                    "restored")

    def _corrupt(self, snapshot_id: str, f: SnapshotFile, size: int, actual: str = "") -> SnapshotCorruptError:
        key = self.key(snapshot_id, f.name)
        if size != f.size:
            what = f"has {size} bytes, the manifest records {f.size}"
        else:
            what = f"fails its checksum: sha256 {actual[:12]}…, the manifest records {f.sha256[:12]}…"
        return SnapshotCorruptError(f"{self.name}: object {key} {what}; snapshot {snapshot_id} will not be "
                                    "restored")

    # --- fetch ----------------------------------------------------------------------------------
    def fetch(self, snapshot_id: str, local: SnapshotStore) -> Snapshot:
        """Download a snapshot into the node's store under the same id and record, each file checked against the
        manifest as it streams; the local copy when the node has it already."""
        if local.has(snapshot_id):
            return local.get(snapshot_id)
        snap = self.get(snapshot_id)
        partial = local.begin_adopt(snapshot_id, snap.size)
        try:
            for f in snap.files:
                self._download(snap, f, partial / f.name)
            local.adopt(snap, partial)
        except BaseException as e:
            local.abort(partial)
            if is_disk_full(e):
                raise local.disk_full(snap.size) from e
            raise
        log.info("snapshot_id=%s fetched from %s (%d files, %d bytes)", snap.id, self.url, len(snap.files),
                 snap.size)
        return snap

    def _download(self, snap: Snapshot, f: SnapshotFile, dest: Path) -> None:
        import obstore

        key = self.key(snap.id, f.name)
        dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        h, size = hashlib.sha256(), 0
        try:
            result = obstore.get(self.store, key)
            if result.meta["size"] != f.size:
                raise self._corrupt(snap.id, f, result.meta["size"])
            with open(dest, "xb") as out:
                for chunk in result.stream(min_chunk_size=CHUNK):
                    size += len(chunk)
                    if size > f.size:  # never more than the manifest says
                        raise self._corrupt(snap.id, f, size)
                    h.update(chunk)
                    out.write(chunk)
        except FileNotFoundError:
            raise self._missing(snap, f) from None
        except (SnapkernelError, OSError):
            raise
        except Exception as e:
            raise self._fail(e, f"reading {key}") from e
        if size != f.size or h.hexdigest() != f.sha256:
            raise self._corrupt(snap.id, f, size, h.hexdigest())

    # --- push -----------------------------------------------------------------------------------
    def push(self, snapshot: Snapshot, directory: Path) -> bool:
        """Upload a committed snapshot of a node's store (from its `directory`): its files, then its manifest.
        False when the shared store has it already, with the same record (nothing is sent); True once sent."""
        import obstore
        from obstore.exceptions import AlreadyExistsError, NotSupportedError, PreconditionError

        check_snapshot_id(snapshot.id)
        if snapshot.damaged:
            raise SnapshotCorruptError(f"snapshot {snapshot.id} is damaged ({snapshot.damaged}): not shared")
        for f in snapshot.files:
            _check_name(snapshot.id, f.name)
        body = manifest_json(snapshot)
        if self._same(snapshot.id, body):
            return False
        for f in snapshot.files:
            self._upload(snapshot, f, directory)
        key = self.key(snapshot.id)
        try:
            try:
                obstore.put(self.store, key, body.encode(), mode="create")
            except NotSupportedError:  # a store without put-if-absent: absent a moment ago, as `_same` found
                obstore.put(self.store, key, body.encode())
        except (AlreadyExistsError, PreconditionError):  # pushed meanwhile, by another daemon
            self._same(snapshot.id, body)  # the same snapshot, or StateError
        except Exception as e:
            raise self._fail(e, f"writing {key}") from e
        log.info("snapshot_id=%s pushed to %s (%d files, %d bytes)", snapshot.id, self.url, len(snapshot.files),
                 snapshot.size)
        return True

    def _same(self, snapshot_id: str, body: str) -> bool:
        """Whether the store has this snapshot with this record already; StateError when it has another one."""
        found = self._read_manifest(snapshot_id)
        if found is None:
            return False
        try:
            same = json.loads(found) == json.loads(body)
        except ValueError:
            same = False
        if not same:
            raise StateError(f"the {self.name} holds another snapshot {snapshot_id} (its manifest differs from "
                             "this node's record); not overwritten")
        return True

    def _upload(self, snap: Snapshot, f: SnapshotFile, directory: Path) -> None:
        import obstore

        key = self.key(snap.id, f.name)
        path = directory / f.name
        # A link is never followed (O_NOFOLLOW here, the real path of its directory): it could lead anywhere on
        # this host, and a kernel writes the links of its workspace.
        if not Path(os.path.realpath(path.parent)).is_relative_to(os.path.realpath(directory)):
            raise StateError(f"snapshot {snap.id}: its file {f.name} lies below a symbolic link; a shared store "
                             "holds plain files only, so this snapshot stays on this node")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise SnapshotCorruptError(f"snapshot {snap.id} is missing its file {f.name}; not shared") from None
        except OSError as e:
            if os.path.islink(path):
                raise StateError(f"snapshot {snap.id}: its file {f.name} is a symbolic link; a shared store holds "
                                 "plain files only, so this snapshot stays on this node") from e
            raise
        h, sent = hashlib.sha256(), 0
        with os.fdopen(fd, "rb") as file:
            st = os.fstat(file.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_size != f.size:
                raise SnapshotCorruptError(f"snapshot {snap.id}: file {f.name} is not the one its record lists "
                                           f"({st.st_size} bytes, recorded {f.size}); not shared")

            def chunks() -> Iterator[bytes]:
                nonlocal sent
                while chunk := file.read(CHUNK):
                    h.update(chunk)
                    sent += len(chunk)
                    yield chunk

            try:
                if f.size <= CHUNK:
                    data = b"".join(chunks())
                    if h.hexdigest() != f.sha256:
                        raise self._changed(snap, f)
                    obstore.put(self.store, key, data, use_multipart=False)
                else:
                    obstore.put(self.store, key, chunks(), chunk_size=_part_size(f.size),
                                max_concurrency=UPLOAD_CONCURRENCY)
            except SnapkernelError:
                raise
            except ValueError as e:  # obstore's: a name it cannot make a key of
                raise StateError(f"snapshot {snap.id}: file {f.name!r} cannot be stored as object {key!r} ({e}); "
                                 "the snapshot stays on this node") from e
            except Exception as e:
                raise self._fail(e, f"writing {key}") from e
        if sent != f.size or h.hexdigest() != f.sha256:
            # Sent already but never published: no manifest names it. Removed, so nothing is left of it.
            self._delete_keys([key])
            raise self._changed(snap, f)

    @staticmethod
    def _changed(snap: Snapshot, f: SnapshotFile) -> SnapshotCorruptError:
        return SnapshotCorruptError(f"snapshot {snap.id}: file {f.name} no longer matches its record's sha256; "
                                    "it was not shared (and will not be restored)")

    # --- delete ---------------------------------------------------------------------------------
    def delete(self, snapshot_id: str) -> None:
        """Remove a snapshot: its manifest first (it is gone at once for every node), then its files. A half
        written one (no manifest) can be removed too; NotFoundError when nothing of it is here."""
        import obstore

        key = self.key(snapshot_id)
        try:
            keys = [m["path"] for batch in obstore.list(self.store, f"{ROOT}/{snapshot_id}/", chunk_size=1000)
                    for m in batch]
        except Exception as e:
            raise self._fail(e, f"listing {ROOT}/{snapshot_id}/") from e
        if not keys:
            raise NotFoundError(f"no snapshot {snapshot_id!r} in the {self.name}")
        if key in keys:
            self._delete_keys([key])
        self._delete_keys([k for k in keys if k != key])
        log.info("snapshot_id=%s deleted from %s", snapshot_id, self.url)

    def _delete_keys(self, keys: Sequence[str]) -> None:
        import obstore

        for i in range(0, len(keys), 1000):  # S3's DeleteObjects takes 1000 keys at most
            try:
                obstore.delete(self.store, keys[i:i + 1000])
            except FileNotFoundError:
                continue
            except Exception as e:
                raise self._fail(e, f"deleting {keys[i]}") from e
