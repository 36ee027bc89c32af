"""The Zarr feature store: create and open a store, read its per-image arrays (naming a damaged
chunk), write whole chunks, cache text vocabularies. Its layout, attributes and codecs are in
zeroseg.stores.schema; the two modules together are the only code that knows the schema.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from typing import Any, Sequence

import fsspec
import numpy as np
import zarr

import zeroseg
from zeroseg.errors import UserError
from zeroseg.geometry import grid_boxes
from zeroseg.stores.lock import LOCK_NAME, StoreLock
from zeroseg.stores.schema import (
    CHECKED,
    COMPACT_ARRAYS,
    COMPRESSED,
    CREATING_MARKER,
    DEDUP_ARRAYS,
    FEATURE_CODECS,
    OUR_ENTRIES,
    READABLE_VERSIONS,
    SCHEMA_VERSION,
    TEACHER_ARRAYS,
    TEACHERS_GROUP,
    Status,
    StoreConfig,
    TeacherInfo,
    config_mismatches,
    teacher_key,
)


class StoreError(UserError):
    """Missing store, wrong schema, a store made differently than asked."""


class StoreNotFoundError(StoreError):
    """No store at that URL (so one may be created there)."""


class DamagedChunkError(StoreError):
    """A chunk of the store cannot be read back (checksum mismatch, truncated, undecodable)."""


class StoreWriteError(StoreError):
    """Writing a chunk failed (disk full, permissions, a vanished mount): the chunk stays pending."""


def _fs_root(url: str):
    fs, root = fsspec.core.url_to_fs(url)
    return fs, root.rstrip("/")


def check_location(url: str) -> str:
    """What is at `url`, for a job that may create a store there: "new" (nothing, or a folder
    holding nothing but our lock), "unfinished" (our interrupted create: its marker), "store"
    (a zeroseg store). Anything else is refused in one line, and nothing is written."""
    fs, root = _fs_root(url)
    if not fs.exists(root):
        return "new"
    if not fs.isdir(root):
        raise StoreError(f"{url} is a file, not a store: give a new or empty folder for the store")
    names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)} - {LOCK_NAME}
    if not names:
        return "new"
    if CREATING_MARKER in names:
        foreign = sorted(names - OUR_ENTRIES)
        if foreign:
            raise StoreError(f"{url} holds an interrupted zeroseg store and also {', '.join(foreign)}: "
                             "not touching it; move those away or give a new STORE")
        return "unfinished"
    if "zarr.json" in names:
        try:
            if "schema_version" in zarr.open_group(_zarr_store(url, read_only=True), mode="r").attrs:
                return "store"
        except (zarr.errors.GroupNotFoundError, FileNotFoundError, ValueError):
            pass
    shown = ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else "")
    raise StoreError(f"{url} is not empty and not a zeroseg store (holds {shown}): "
                     "zeroseg will not write there; give a new or empty folder")


def make_store_folder(url: str) -> None:
    """Make the (checked, new) store's folder, so that the job's lock can be taken inside it."""
    fs, root = _fs_root(url)
    fs.makedirs(root, exist_ok=True)


def _zarr_store(url: str, read_only: bool):
    """A plain path or file:// URL is a LocalStore (creates folders as it writes); anything else
    goes through fsspec (memory://, s3://, gs://, ...)."""
    if "://" not in url or url.startswith("file://"):
        path = url[len("file://"):] if url.startswith("file://") else url
        return zarr.storage.LocalStore(path, read_only=read_only)
    return zarr.storage.FsspecStore.from_url(url, read_only=read_only)


def _rows(key, n: int) -> range:
    """The rows (first axis) an index key selects: int, slice, index array, or a tuple of them."""
    first = key[0] if isinstance(key, tuple) else key
    if isinstance(first, slice):
        return range(*first.indices(n))
    picked = np.atleast_1d(np.asarray(first))
    if picked.dtype == bool:
        picked = np.flatnonzero(picked)
    picked = np.where(picked < 0, picked + n, picked)
    return range(int(picked.min()), int(picked.max()) + 1) if picked.size else range(0)


def _short_cause(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return "checksum mismatch" if "checksum" in text.lower() else f"{type(e).__name__}: {text[:80]}"


def create_dedup_arrays(group: zarr.Group, n: int, chunk_images: int) -> None:
    """images/hash ("": not hashed) and images/duplicate_of (-1: none) of n rows (schema version 4)."""
    group.create_array("images/hash", shape=(n,), chunks=(chunk_images,), dtype=str, compressors=CHECKED)
    group.create_array("images/duplicate_of", shape=(n,), chunks=(chunk_images,), dtype="int64", fill_value=-1,
                       compressors=CHECKED)


class StoreArray:
    """One per-image array of a store (chunked along images by chunk_images). Reads that fail on a
    damaged chunk raise DamagedChunkError naming the array, the chunk and its images, and how to
    repair it: every reader (train, index build, query, extract's resume) gets that one line from
    here. Anything else (shape, dtype, writes) is the zarr array's."""

    def __init__(self, array: zarr.Array, name: str, url: str):
        self.array, self.name, self.url = array, name, url

    def __getattr__(self, attr):
        return getattr(self.array, attr)

    def __setitem__(self, key, value) -> None:
        self.array[key] = value

    def __getitem__(self, key):
        try:
            return self.array[key]
        except Exception as e:
            # Pin the failure on one chunk by reading each chunk of the selection alone; if none
            # fails by itself the error is not a damaged chunk (a bad key, a bug): let it be.
            try:
                rows = _rows(key, self.array.shape[0])
            except Exception:
                raise e
            b = self.array.chunks[0]
            for chunk in range(rows.start // b, -(-rows.stop // b)):
                self.read_chunk(chunk)
            raise

    def chunk_rows(self, chunk: int) -> slice:
        b = self.array.chunks[0]
        return slice(chunk * b, min((chunk + 1) * b, self.array.shape[0]))

    def is_raw(self) -> bool:
        """Stored uncompressed: little-endian bytes, then at most a checksum (FEATURE_CODECS)."""
        codecs = [c.to_dict() for c in self.array.metadata.codecs]
        little = {"name": "bytes", "configuration": {"endian": "little"}}
        return codecs[0] in (little, {"name": "bytes"}) and all(c["name"] == "crc32c" for c in codecs[1:])

    def raw_chunk_files(self) -> list[str] | None:
        """The file of each chunk (along images) when it holds the chunk's rows raw at offset 0:
        little-endian, C order, then only a checksum (FEATURE_CODECS), on a local filesystem, one
        chunk across the other axes; what stores/mapped.py maps. None when not (compressed,
        remote). A chunk never written (all fill) has no file."""
        a = self.array
        store = a.store_path.store
        if not (isinstance(store, zarr.storage.LocalStore) and self.is_raw() and tuple(a.chunks[1:]) == tuple(a.shape[1:])):
            return None
        root = os.path.join(str(store.root), a.store_path.path)
        rest = (0,) * (a.ndim - 1)
        return [os.path.join(root, a.metadata.encode_chunk_key((i, *rest))) for i in range(-(-a.shape[0] // a.chunks[0]))]

    def read_chunk(self, chunk: int) -> np.ndarray:
        """Chunk `chunk` of this array, or DamagedChunkError naming it."""
        sl = self.chunk_rows(chunk)
        try:
            return self.array[sl]
        except Exception as e:
            raise DamagedChunkError(
                f"{self.url}: {self.name} chunk {chunk} (images {sl.start}-{sl.stop - 1}) is damaged "
                f"({_short_cause(e)}): run `zeroseg store verify --repair {self.url}`, then extract again"
            ) from None


class FeatureStore:
    """A handle on one store, seen through one of its teachers. Create with `create`, open with
    `open`; never construct directly.

    The handle's teacher (`teacher_key`; default the first) decides what `config.teacher`, `dim`,
    `features`, `status()`, `errors()`, `extract_options`, the text vocabularies and `identity()`
    are: an added teacher's own arrays (schema version 5), everything else shared. So a reader
    opened with a teacher key (train, index build, query, text) reads that teacher throughout."""

    def __init__(self, group: zarr.Group, url: str, teacher: str | None = None):
        self.group = group
        self.url = url
        first = StoreConfig.from_attrs(dict(group.attrs))
        self.first_teacher_key = teacher_key(first.teacher)
        self.teacher_key = teacher or self.first_teacher_key
        if self.teacher_key == self.first_teacher_key:
            self.config = first
        elif self.teacher_key in self.added_teachers:
            added = TeacherInfo.from_dict(self.added_teachers[self.teacher_key]["teacher"])
            self.config = dataclasses.replace(first, teacher=added)
        else:
            raise StoreError(f"{url} has no teacher {self.teacher_key!r} (has: {', '.join(self.teacher_keys())})")

    # ---- create / open -------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        url: str,
        config: StoreConfig,
        paths: Sequence[str],
        extract: dict[str, Any] | None = None,
        metadata: Sequence[str] | None = None,
    ) -> FeatureStore:
        """A new store for `paths`, all pending, where nothing is or in an empty folder (see
        check_location); an interrupted create of ours is redone. Refuses anything else. A job
        calls this holding the store's lock (the lock file is the one entry allowed beside)."""
        if not paths:
            raise StoreError("no images to store")
        state = check_location(url)
        if state == "store":
            raise StoreError(f"{url} already holds a store; open it instead of creating one")
        fs, root = _fs_root(url)
        try:
            if state == "unfinished":
                # Everything here but the lock was written by our interrupted create (check_location
                # refuses a marker beside anything else): remove what it made, keep the marker.
                for name in sorted(OUR_ENTRIES - {CREATING_MARKER}):
                    if fs.exists(f"{root}/{name}"):
                        fs.rm(f"{root}/{name}", recursive=True)
            else:
                fs.makedirs(root, exist_ok=True)
                fs.pipe(f"{root}/{CREATING_MARKER}", json.dumps({"zeroseg_version": zeroseg.__version__}).encode())
            store = _zarr_store(url, read_only=False)
            group = zarr.create_group(store, zarr_format=3)
            n, c, b, s = len(paths), config.n_crops, config.chunk_images, config.view_size
            d = config.teacher.embed_dim
            group.create_array(
                "crops/features", shape=(n, c, d), chunks=(b, c, d), dtype="float16",
                compressors=FEATURE_CODECS, fill_value=0,
            )
            group.create_array("crops/boxes", data=grid_boxes(config.grids), compressors=CHECKED)
            group.create_array("images/path", shape=(n,), chunks=(b,), dtype=str, compressors=CHECKED)
            group["images/path"][:] = np.asarray(paths, dtype=str)
            if metadata is not None:  # written once, like the paths: it comes with the listing
                group.create_array("images/meta", shape=(n,), chunks=(b,), dtype=str, compressors=COMPRESSED)
                group["images/meta"][:] = np.asarray(metadata, dtype=str)
            group.create_array("images/status", shape=(n,), chunks=(b,), dtype="uint8", fill_value=0,
                               compressors=CHECKED)
            group.create_array("images/error", shape=(n,), chunks=(b,), dtype=str, compressors=CHECKED)
            group.create_array("images/size", shape=(n, 2), chunks=(b, 2), dtype="int32", fill_value=0,
                               compressors=CHECKED)
            create_dedup_arrays(group, n, b)
            if config.pixels:
                group.create_array(
                    "images/pixels", shape=(n, s, s, 3), chunks=(b, s, s, 3), dtype="uint8",
                    compressors=COMPRESSED, fill_value=0,
                )
            # One metadata write (attrs.update would write once per key: a reader could see half),
            # then the marker goes: from here on the folder is a store.
            group.update_attributes({**config.to_attrs(), "extract": extract or {}})
            fs.rm(f"{root}/{CREATING_MARKER}")
        except OSError as e:  # disk full, permissions: the marker (if written) makes a re-run redo it
            raise StoreWriteError(f"{url}: creating the store failed: {e.strerror or e}; "
                                  "free the space and re-run the same command") from None
        return cls(group, url)

    @classmethod
    def open(cls, url: str, mode: str = "r", expect: StoreConfig | None = None, teacher: str | None = None) -> FeatureStore:
        """Open an existing store through `teacher` (a key of teacher_keys(); None the first); with
        `expect`, refuse one whose features mean something else."""
        try:
            group = zarr.open_group(_zarr_store(url, read_only=mode == "r"), mode=mode)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            raise StoreNotFoundError(f"no feature store at {url}")
        fs, root = _fs_root(url)
        if fs.exists(f"{root}/{CREATING_MARKER}"):
            raise StoreNotFoundError(f"{url} holds only an unfinished store (its creation was interrupted)")
        version = group.attrs.get("schema_version")
        if version is None:
            raise StoreError(f"{url} is a Zarr group without zeroseg's attributes, not a feature store")
        if version not in READABLE_VERSIONS:
            raise StoreError(
                f"{url}: schema version {version}, this zeroseg reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}"
            )
        fs = cls(group, url, teacher)
        if expect is not None:
            problems = config_mismatches(expect, fs.config)
            if problems:
                raise StoreError(f"{url} was made differently: " + "; ".join(problems))
        return fs

    # ---- teachers ----------------------------------------------------------------------

    @property
    def added_teachers(self) -> dict[str, dict[str, Any]]:
        """key -> {"teacher": TeacherInfo as a dict, "extract": its job's options}: the teachers
        added beside the first (schema version 5)."""
        return dict(self.group.attrs.get("teachers", {}))

    def teacher_keys(self) -> list[str]:
        """Every teacher's key, the first teacher's first."""
        return [self.first_teacher_key, *self.added_teachers]

    @property
    def is_added_teacher(self) -> bool:
        return self.teacher_key != self.first_teacher_key

    def first_teacher(self) -> FeatureStore:
        """This store seen through its first teacher (whose rows decide which images failed)."""
        return self if not self.is_added_teacher else FeatureStore(self.group, self.url)

    def _path(self, name: str) -> str:
        """Where the handle's teacher keeps array `name`: an added teacher's own features, status
        and error are under teachers/<key>/; every other array is shared."""
        if self.is_added_teacher and name in TEACHER_ARRAYS:
            return f"{TEACHERS_GROUP}/{self.teacher_key}/{TEACHER_ARRAYS[name]}"
        return name

    def require_teachers_schema(self) -> None:
        """Refuse, in one line, to add a teacher to a store older than version 5 (an older zeroseg
        could open it and grow its rows without the added teacher's)."""
        version = self.group.attrs["schema_version"]
        if version != SCHEMA_VERSION:
            raise StoreError(f"{self.url} is schema version {version}; another teacher needs version {SCHEMA_VERSION}: "
                             f"run `zeroseg store migrate {self.url}` first")

    def add_teacher(self, teacher: TeacherInfo, extract: dict[str, Any]) -> FeatureStore:
        """Add `teacher` beside the store's (schema version 5): its features, status (all pending)
        and error arrays, then its record in the attributes (one write: the teacher exists once its
        arrays do; arrays an interrupted add left are made again). Returns the store seen through
        it. Call it holding the lock, on a store whose first teacher is done."""
        self.require_teachers_schema()
        key = teacher_key(teacher)
        if key in self.teacher_keys():
            raise StoreError(f"{self.url} already has teacher {key}")
        n, c, b = self.n_images, self.n_crops, self.config.chunk_images
        try:
            group = self.group.require_group(TEACHERS_GROUP)
            if key in group:
                del group[key]  # an interrupted add's, never registered
            own = group.create_group(key)
            own.create_array("features", shape=(n, c, teacher.embed_dim), chunks=(b, c, teacher.embed_dim),
                             dtype="float16", compressors=FEATURE_CODECS, fill_value=0)
            own.create_array("status", shape=(n,), chunks=(b,), dtype="uint8", fill_value=0, compressors=CHECKED)
            own.create_array("error", shape=(n,), chunks=(b,), dtype=str, compressors=CHECKED)
            added = {**self.added_teachers, key: {"teacher": dataclasses.asdict(teacher), "extract": extract}}
            self.group.update_attributes({"teachers": added})
        except OSError as e:
            raise StoreWriteError(f"{self.url}: adding teacher {key} failed: {e.strerror or e}; "
                                  "free the space and re-run the same command") from None
        return FeatureStore(self.group, self.url, key)

    # ---- shape -------------------------------------------------------------------------

    @property
    def n_images(self) -> int:
        return self.group["images/path"].shape[0]

    @property
    def n_crops(self) -> int:
        return self.config.n_crops

    @property
    def dim(self) -> int:
        return self.config.teacher.embed_dim

    @property
    def n_chunks(self) -> int:
        return -(-self.n_images // self.config.chunk_images)

    @property
    def has_pixels(self) -> bool:
        return "pixels" in self.group["images"]

    @property
    def extract_options(self) -> dict[str, Any]:
        """The extract options of the handle's teacher's job."""
        if self.is_added_teacher:
            return dict(self.added_teachers[self.teacher_key].get("extract", {}))
        return dict(self.group.attrs.get("extract", {}))

    def chunk_slice(self, chunk: int) -> slice:
        b = self.config.chunk_images
        return slice(chunk * b, min((chunk + 1) * b, self.n_images))

    # ---- per-image arrays --------------------------------------------------------------

    def array(self, name: str) -> StoreArray:
        """A per-image array ("crops/features", "images/status", ...; PER_IMAGE_ARRAYS) whose reads
        name a damaged chunk in one line; features, status and error are the handle's teacher's."""
        path = self._path(name)
        return StoreArray(self.group[path], path, self.url)

    @property
    def features(self) -> StoreArray:
        return self.array("crops/features")

    @property
    def boxes(self) -> np.ndarray:
        return StoreArray(self.group["crops/boxes"], "crops/boxes", self.url)[:]

    @property
    def pixels(self) -> StoreArray:
        return self.array("images/pixels")

    def paths(self) -> np.ndarray:
        return self.array("images/path")[:]

    def metadata(self) -> np.ndarray | None:
        """Each image's metadata (JSON object text, "" none); None for a store without any."""
        return self.array("images/meta")[:] if "meta" in self.group["images"] else None

    def status(self) -> np.ndarray:
        return self.array("images/status")[:]

    def errors(self) -> np.ndarray:
        return self.array("images/error")[:]

    def sizes(self) -> np.ndarray:
        return self.array("images/size")[:]

    @property
    def has_dedup(self) -> bool:
        """Whether the store records its images' hashes (schema version 4; `store migrate` adds them)."""
        return "hash" in self.group["images"]

    def hashes(self) -> np.ndarray:
        """Each image's content hash, "" not hashed; all "" for a store without them."""
        return self.array("images/hash")[:] if self.has_dedup else np.full(self.n_images, "", dtype=object)

    def duplicate_of(self) -> np.ndarray:
        """Each image's first row with the same bytes, -1 none (the store embedded it itself)."""
        return self.array("images/duplicate_of")[:] if self.has_dedup else np.full(self.n_images, -1, np.int64)

    def distinct_ok(self) -> np.ndarray:
        """(n_images,) bool: status-ok rows that are not a copy of an earlier row (duplicate_of):
        what an index holds, each distinct image once."""
        return (self.status() == Status.OK) & (self.duplicate_of() < 0)

    def mark_duplicates(self, hashes: dict[int, str]) -> np.ndarray:
        """Record the content hashes of pending rows (row -> hash, "" unreadable), then point each
        pending row at the first row with the same hash (duplicate_of; -1 none). Done rows keep
        what they hold. Only the chunks of pending rows are written; a kill leaves those rows
        pending, and the next job marks them again. Returns duplicate_of, all rows."""
        hash_of, duplicate_of = self.hashes().astype(object), self.duplicate_of()
        for row, h in hashes.items():
            hash_of[row] = h
        pending = self.status() == Status.PENDING
        first: dict[str, int] = {}
        for row, h in enumerate(hash_of):
            if not h:
                continue
            if h in first and pending[row]:
                duplicate_of[row] = first[h]
            else:
                first.setdefault(h, row)
                if pending[row]:
                    duplicate_of[row] = -1
        for chunk in sorted({row // self.config.chunk_images for row in np.flatnonzero(pending)}):
            sl = self.chunk_slice(chunk)
            self.group["images/hash"][sl] = hash_of[sl].astype(str)
            self.group["images/duplicate_of"][sl] = duplicate_of[sl]
        return duplicate_of

    def listed_paths(self) -> np.ndarray:
        """The image paths up to the first empty one: rows past it were made by an `append` that
        was killed while writing their paths, and the next append writes them again."""
        paths = self.paths()
        empty = np.flatnonzero(paths == "")
        return paths[: empty[0]] if empty.size else paths

    def append(self, paths: Sequence[str], metadata: Sequence[str] | None = None) -> slice:
        """Add `paths` as pending rows after the listed ones (see listed_paths); returns their rows.
        Every per-image array grows along images, the existing rows keep their values. images/path
        (which says how many images the store has) grows last: a kill before that leaves the store
        as it was, a kill while its paths are written leaves empty paths for the next append to
        overwrite. Compact targets grow when `store compact` next runs. Call it holding the lock."""
        at = len(self.listed_paths())
        n = at + len(paths)
        try:
            grown = ("crops/features", "images/pixels", "images/size", "images/error", "images/status", "images/meta",
                     *DEDUP_ARRAYS)
            grown += tuple(f"{TEACHERS_GROUP}/{key}/{leaf}" for key in self.added_teachers for leaf in TEACHER_ARRAYS.values())
            for name in grown:
                if name in self.group:
                    self.group[name].resize((n, *self.group[name].shape[1:]))
            # rows a shrink dropped come back with what they held (zarr keeps an edge chunk's bytes):
            # pending (for every teacher) and not hashed, so that the job hashes and writes them whole
            statuses = ["images/status", *(f"{TEACHERS_GROUP}/{key}/{TEACHER_ARRAYS['images/status']}"
                                           for key in self.added_teachers)]
            for status in statuses:
                self.group[status][at:n] = np.full(n - at, Status.PENDING, np.uint8)
            if self.has_dedup:
                self.group["images/hash"][at:n] = np.full(n - at, "", dtype=str)
                self.group["images/duplicate_of"][at:n] = np.full(n - at, -1, np.int64)
            if "images/meta" in self.group:
                self.group["images/meta"][at:n] = np.asarray(metadata if metadata is not None else [""] * (n - at), dtype=str)
            self.group["images/path"].resize((n,))
            self.group["images/path"][at:n] = np.asarray(paths, dtype=str)
        except OSError as e:
            raise StoreWriteError(f"{self.url}: appending {n - at} images failed: {e.strerror or e}; "
                                  "free the space and re-run the same command") from None
        return slice(at, n)

    def mark_pending(self, chunk: int) -> None:
        """Set the chunk's status rows (the handle's teacher's) pending, for `extract` to redo it whole."""
        sl = self.chunk_slice(chunk)
        self.group[self._path("images/status")][sl] = np.full(sl.stop - sl.start, Status.PENDING, np.uint8)

    def pending_chunks(self) -> list[int]:
        """Chunks not yet complete. A chunk's status is written last and all at once, so one
        pending image means the chunk never finished."""
        status = self.status()
        return [i for i in range(self.n_chunks) if (status[self.chunk_slice(i)] == Status.PENDING).any()]

    def write_chunk(
        self,
        chunk: int,
        features: np.ndarray,
        status: np.ndarray,
        errors: Sequence[str],
        sizes: np.ndarray,
        pixels: np.ndarray | None = None,
        skip: int = 0,
    ) -> None:
        """Write one whole chunk: data first, status last (that is what makes a chunk complete).
        The data cover the whole chunk; with `skip`, its first `skip` rows are kept as they are
        (an append filled the chunk's tail: those rows were done before)."""
        whole = self.chunk_slice(chunk)
        n = whole.stop - whole.start
        if features.shape != (n, self.n_crops, self.dim):
            raise ValueError(f"chunk {chunk}: features {features.shape}, want {(n, self.n_crops, self.dim)}")
        if (np.asarray(status) == Status.PENDING).any():
            raise ValueError(f"chunk {chunk}: every image must end ok or failed")
        sl = slice(whole.start + skip, whole.stop)
        features, status, errors, sizes = features[skip:], np.asarray(status)[skip:], list(errors)[skip:], sizes[skip:]
        pixels = pixels[skip:] if pixels is not None else None
        # A compact copy of this chunk (schema: compact targets) is marked unwritten first, so
        # that it cannot outlive the features it was made from (the first teacher's only).
        for _, scale in COMPACT_ARRAYS.values() if not self.is_added_teacher else ():
            if scale in self.group and self.group[scale].shape[0] > sl.start:
                stop = min(sl.stop, self.group[scale].shape[0])
                self.group[scale][sl.start:stop] = np.full((stop - sl.start, self.n_crops), np.nan, np.float16)
        writes = [("crops/features", features.astype(np.float16))]
        if not self.is_added_teacher:  # an added teacher writes only its own arrays: views and sizes are the first's
            if self.has_pixels and pixels is not None:
                writes.append(("images/pixels", pixels))
            writes.append(("images/size", sizes))
        writes += [("images/error", np.asarray(errors, dtype=str)),
                   ("images/status", np.asarray(status, dtype=np.uint8))]  # status last: see above
        for name, data in writes:
            try:
                self.group[self._path(name)][sl] = data
            except OSError as e:  # disk full, permissions, a vanished mount: stop, name it
                raise StoreWriteError(
                    f"{self.url}: writing {name} of chunk {chunk} (images {sl.start}-{sl.stop - 1}) failed: "
                    f"{e.strerror or e}; the chunk stays pending: free the space and re-run the same command"
                ) from None

    def read_chunk(self, chunk: int) -> dict[str, np.ndarray]:
        out = {"features": self.features.read_chunk(chunk), "status": self.array("images/status").read_chunk(chunk)}
        if self.has_pixels:
            out["pixels"] = self.pixels.read_chunk(chunk)
        return out

    # ---- text vocabularies -------------------------------------------------------------

    # A vocabulary is written as a new generation (a sub-group holding names, embeddings and
    # attributes), then made current by one metadata write of the vocabulary's pointer, then the
    # old generations are deleted: a crash leaves the old vocabulary or the new one, never a mix,
    # and the next write clears what an interrupted one left. Stores written before generations
    # hold names and embeddings directly in text/<vocab> (no pointer); they still read.

    @property
    def _text_path(self) -> str:
        """The handle's teacher's vocabularies: text/ for the first, teachers/<key>/text for an added one."""
        return f"{TEACHERS_GROUP}/{self.teacher_key}/text" if self.is_added_teacher else "text"

    def vocabularies(self) -> list[str]:
        if self._text_path not in self.group:
            return []
        text = self.group[self._text_path]
        return sorted(v for v in text.group_keys() if self._vocabulary_group(text[v]) is not None)

    @staticmethod
    def _vocabulary_group(g: zarr.Group) -> zarr.Group | None:
        """The group holding a vocabulary's current names and embeddings; None before its first
        write completed."""
        current = g.attrs.get("current")
        if current is not None:
            return g[current]
        return g if "names" in g else None  # a store from before generations

    def write_text(
        self, vocab: str, names: Sequence[str], embeddings: np.ndarray, templates: Sequence[str]
    ) -> None:
        """Cache a vocabulary's text embeddings (K, D); replaces one of the same name, under the
        store's lock."""
        if embeddings.shape != (len(names), self.dim):
            raise StoreError(
                f"vocabulary {vocab}: embeddings {embeddings.shape}, store wants ({len(names)}, {self.dim})"
            )
        with StoreLock(self.url):
            g = self.group.require_group(self._text_path).require_group(vocab)
            generation = f"g{uuid.uuid4().hex[:12]}"
            new = g.create_group(generation)
            new.create_array("names", shape=(len(names),), dtype=str, compressors=CHECKED)[:] = np.asarray(names, dtype=str)
            new.create_array("embeddings", data=embeddings.astype(np.float32), compressors=CHECKED)
            new.update_attributes({"templates": list(templates), "teacher": dataclasses.asdict(self.config.teacher)})
            g.update_attributes({"current": generation})  # the switch: one metadata write
            for old in [k for k in g.array_keys()] + [k for k in g.group_keys() if k != generation]:
                del g[old]

    def read_text(self, vocab: str) -> tuple[list[str], np.ndarray]:
        if vocab not in self.vocabularies():
            have = ", ".join(self.vocabularies()) or "none"
            whose = f" of teacher {self.teacher_key}" if self.is_added_teacher else ""
            raise StoreError(f"{self.url} has no vocabulary {vocab!r}{whose} (has: {have})"
                             + (f": `zeroseg text {self.url} --teacher-key {self.teacher_key} --vocab {vocab} ...` "
                                "embeds it" if whose else ""))
        g = self._vocabulary_group(self.group[self._text_path][vocab])
        made_by = TeacherInfo.from_dict(g.attrs["teacher"])
        if made_by != self.config.teacher:
            raise StoreError(
                f"vocabulary {vocab!r} was embedded by {made_by.arch}/{made_by.pretrained}, "
                f"the store's features by {self.config.teacher.arch}/{self.config.teacher.pretrained}"
            )
        return list(g["names"][:]), g["embeddings"][:]

    def identity(self) -> dict[str, Any]:
        """What a checkpoint or index records to know which store it came from."""
        return {
            "url": self.url,
            "n_images": self.n_images,
            "grids": list(self.config.grids),
            "view_size": self.config.view_size,
            "teacher": dataclasses.asdict(self.config.teacher),
        }

    def __repr__(self) -> str:
        return json.dumps({"url": self.url, "n_images": self.n_images, "n_crops": self.n_crops, "dim": self.dim})
