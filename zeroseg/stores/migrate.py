"""`zeroseg store migrate STORE`: a version-1 to -4 store made version 5, in place, crash-safe; and
crop features that a store compressed (every store written before 2026-12-03) rewritten raw, so
that an index re-ranks from them in place (stores/mapped.py; the version stays 5).

4 -> 5 changes no array (version 5 only allows teachers beside the first): one attribute write.

3 -> 4 adds images/hash (all "": the rows extracted before are not hashed, so a later row is
never taken for a duplicate of one of them) and images/duplicate_of (all -1), then writes the
version: a kill in between leaves a version-3 store whose re-run adds what is missing.

2 -> 3 changes no array (version 3 only adds optional compact targets): one attribute write.

1 -> 3 rewrites every array with version 3's codecs (a crc32c checksum after the compressor), so
that a damaged chunk fails its read. Under the store's lock, in three steps, each one resumable:

1. stage: every array is copied, chunk by chunk, into STORE/zeroseg.migrating/<its path>; a
   killed stage is thrown away and redone (the original arrays are untouched meanwhile);
2. the group's attribute `migration` is set to "staged" (one metadata write): the copies are complete;
3. swap: each original array folder is removed and its staged copy moved into its place; then
   schema_version 3 is written (and `migration` dropped) in one write, and the staging folder removed.

A re-run after a kill in step 3 finishes the swap from the staged copies. Raw features are
rewritten by the same three steps, over the feature arrays only. The store's attributes
(teacher, grids, extract record) are kept as they are: a version-1 store's extract record lacks
threads, device and precision, and `extract` keeps saying so.
"""

from __future__ import annotations

import warnings
from typing import Callable

import fsspec
import zarr

from zeroseg.stores.features import FeatureStore, StoreArray, create_dedup_arrays
from zeroseg.stores.lock import StoreLock
from zeroseg.stores.schema import (
    CHECKED,
    COMPRESSED,
    DEDUP_ARRAYS,
    FEATURE_CODECS,
    MIGRATING_DIR,
    SCHEMA_VERSION,
    TEACHERS_GROUP,
)

CODECS = {"images/pixels": COMPRESSED, "crops/int8": COMPRESSED, "crops/pq_codes": COMPRESSED}  # else CHECKED


def _arrays(group: zarr.Group) -> list[str]:
    with warnings.catch_warnings():  # zarr notes our lock file is no Zarr node: it is not meant to be
        warnings.simplefilter("ignore")
        members = list(group.members(max_depth=None))
    return sorted(name for name, member in members if isinstance(member, zarr.Array) and not name.startswith(MIGRATING_DIR))


def _is_features(name: str) -> bool:
    """Crop features: the first teacher's, or an added teacher's (teachers/<key>/features)."""
    return name == "crops/features" or (name.startswith(f"{TEACHERS_GROUP}/") and name.endswith("/features"))


def _stage(group: zarr.Group, name: str) -> None:
    """Copy array `name` into the staging folder with version 3's codecs, one chunk of rows at a time."""
    src = group[name]
    dst = group.create_array(
        f"{MIGRATING_DIR}/{name}", shape=src.shape, chunks=src.chunks, dtype=src.dtype, fill_value=src.fill_value,
        compressors=FEATURE_CODECS if _is_features(name) else CODECS.get(name, CHECKED), attributes=dict(src.attrs),
    )
    step = src.chunks[0] if src.ndim else 1
    for start in range(0, src.shape[0] if src.ndim else 1, step):
        dst[start : start + step] = src[start : start + step]


def _swap(fs, root: str, name: str) -> None:
    staged, original = f"{root}/{MIGRATING_DIR}/{name}", f"{root}/{name}"
    if not fs.exists(staged):
        return  # swapped by the killed run
    if fs.exists(original):
        fs.rm(original, recursive=True)
    fs.mv(staged, original, recursive=True)


def migrate_store(url: str, notify: Callable[[str], None] = print) -> str:
    """Make the store at `url` version 5 (SCHEMA_VERSION) with raw crop features; returns what was
    done, in one line."""
    with StoreLock(url):
        store = FeatureStore.open(url, mode="r+")
        version = store.group.attrs["schema_version"]
        rewritten, added = [], []
        if version == 1:
            rewritten.append(_checksums(store, url, notify))
        if version < 4:
            for name in DEDUP_ARRAYS:  # both or neither: a kill between them leaves the first
                if name in store.group:
                    del store.group[name]
            create_dedup_arrays(store.group, store.n_images, store.config.chunk_images)
            added.append("image hashes added (empty for the rows extracted before: they are not deduplicated)")
        compressed = _compressed_features(store)
        if compressed or store.group.attrs.get("migration") == "staged":
            rewritten.append(_raw_features(store, url, compressed, notify))
        if version == SCHEMA_VERSION and not rewritten:
            return f"{url} is already schema version {SCHEMA_VERSION} with raw features: nothing to do"
        store.group.update_attributes({"schema_version": SCHEMA_VERSION})
    done = "; ".join((rewritten or ["no array rewritten"]) + added)
    return f"{url}: {done}" if version == SCHEMA_VERSION else f"{url}: schema version {version} -> {SCHEMA_VERSION}: {done}"


def _compressed_features(store: FeatureStore) -> list[str]:
    """The crop feature arrays (the first teacher's and added ones') not stored raw (FEATURE_CODECS):
    written before features were, they cannot be read by row in place (stores/mapped.py)."""
    names = [name for name in _arrays(store.group) if _is_features(name)]
    return [name for name in names if not StoreArray(store.group[name], name, store.url).is_raw()]


def _raw_features(store: FeatureStore, url: str, names: list[str], notify: Callable[[str], None]) -> str:
    """Compressed feature arrays rewritten raw, by the same three resumable steps (the version stays)."""
    count = _rewrite(store, url, names, {}, notify)
    return f"{count} feature arrays rewritten raw (an index re-ranks from them in place)"


def _checksums(store: FeatureStore, url: str, notify: Callable[[str], None]) -> str:
    """1 -> 3: every array rewritten with checksums (the module docstring's three steps)."""
    names = [] if store.group.attrs.get("migration") == "staged" else _arrays(store.group)
    count = _rewrite(store, url, names, {"schema_version": 3}, notify)  # one write: the store is version 3
    return f"{count} arrays rewritten with checksums"


def _rewrite(store: FeatureStore, url: str, names: list[str], attrs: dict, notify: Callable[[str], None]) -> int:
    """Arrays `names` staged with today's codecs, then swapped in place of the originals, and
    `attrs` written with the end of the migration (one write); a migration interrupted after its
    staging finishes from the staged copies (`names` is then ignored). Returns the arrays swapped."""
    group = store.group
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    if group.attrs.get("migration") != "staged":
        if fs.exists(f"{root}/{MIGRATING_DIR}"):
            notify(f"{url}: redoing an interrupted migration from its start")
            fs.rm(f"{root}/{MIGRATING_DIR}", recursive=True)
        for name in names:
            _stage(group, name)
        group.update_attributes({"migration": "staged"})
    else:
        notify(f"{url}: finishing an interrupted migration")
    staged = _arrays(zarr.open_group(group.store, path=MIGRATING_DIR, mode="r"))
    for name in staged:
        _swap(fs, root, name)
    kept = {k: v for k, v in dict(group.attrs).items() if k != "migration"}
    group.attrs.put({**kept, **attrs})
    fs.rm(f"{root}/{MIGRATING_DIR}", recursive=True)
    return len(staged)
