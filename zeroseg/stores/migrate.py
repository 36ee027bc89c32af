"""`zeroseg store migrate STORE`: a version-1 to -4 store made version 5, in place, crash-safe.

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

A re-run after a kill in step 3 finishes the swap from the staged copies. The store's attributes
(teacher, grids, extract record) are kept as they are: a version-1 store's extract record lacks
threads, device and precision, and `extract` keeps saying so.
"""

from __future__ import annotations

import warnings
from typing import Callable

import fsspec
import zarr

from zeroseg.stores.features import FeatureStore, create_dedup_arrays
from zeroseg.stores.lock import StoreLock
from zeroseg.stores.schema import CHECKED, COMPRESSED, DEDUP_ARRAYS, FEATURE_CODECS, MIGRATING_DIR, SCHEMA_VERSION

CODECS = {"crops/features": FEATURE_CODECS, "images/pixels": COMPRESSED, "crops/int8": COMPRESSED,
          "crops/pq_codes": COMPRESSED}  # the rest: CHECKED


def _arrays(group: zarr.Group) -> list[str]:
    with warnings.catch_warnings():  # zarr notes our lock file is no Zarr node: it is not meant to be
        warnings.simplefilter("ignore")
        members = list(group.members(max_depth=None))
    return sorted(name for name, member in members if isinstance(member, zarr.Array) and not name.startswith(MIGRATING_DIR))


def _stage(group: zarr.Group, name: str) -> None:
    """Copy array `name` into the staging folder with version 3's codecs, one chunk of rows at a time."""
    src = group[name]
    dst = group.create_array(
        f"{MIGRATING_DIR}/{name}", shape=src.shape, chunks=src.chunks, dtype=src.dtype, fill_value=src.fill_value,
        compressors=CODECS.get(name, CHECKED), attributes=dict(src.attrs),
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
    """Make the store at `url` version 5 (SCHEMA_VERSION); returns what was done, in one line."""
    with StoreLock(url):
        store = FeatureStore.open(url, mode="r+")
        version = store.group.attrs["schema_version"]
        if version == SCHEMA_VERSION:
            return f"{url} is already schema version {SCHEMA_VERSION}: nothing to do"
        done = "no array rewritten"
        if version == 1:
            done = _checksums(store, url, notify)
        if version < 4:
            for name in DEDUP_ARRAYS:  # both or neither: a kill between them leaves the first
                if name in store.group:
                    del store.group[name]
            create_dedup_arrays(store.group, store.n_images, store.config.chunk_images)
            done += "; image hashes added (empty for the rows extracted before: they are not deduplicated)"
        store.group.update_attributes({"schema_version": SCHEMA_VERSION})
    return f"{url}: schema version {version} -> {SCHEMA_VERSION}: {done}"


def _checksums(store: FeatureStore, url: str, notify: Callable[[str], None]) -> str:
    """1 -> 3: every array rewritten with checksums (the module docstring's three steps)."""
    group = store.group
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    if group.attrs.get("migration") != "staged":
        if fs.exists(f"{root}/{MIGRATING_DIR}"):
            notify(f"{url}: redoing an interrupted migration from its start")
            fs.rm(f"{root}/{MIGRATING_DIR}", recursive=True)
        names = _arrays(group)
        for name in names:
            _stage(group, name)
        group.update_attributes({"migration": "staged"})
    else:
        notify(f"{url}: finishing an interrupted migration")
    names = _arrays(zarr.open_group(group.store, path=MIGRATING_DIR, mode="r"))
    for name in names:
        _swap(fs, root, name)
    attrs = {k: v for k, v in dict(group.attrs).items() if k != "migration"}
    group.attrs.put({**attrs, "schema_version": 3})  # one write: the store is version 3
    fs.rm(f"{root}/{MIGRATING_DIR}", recursive=True)
    return f"{len(names)} arrays rewritten with checksums"

