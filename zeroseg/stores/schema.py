"""The feature store's schema: its layout, attributes, codecs and versions (DESIGN.md, "Store schema").

Layout of a version-4 store (a Zarr v3 group):

    attrs                 schema_version, teacher{...}, grids, view_size, dtype, chunk_images,
                          pixels, zeroseg_version, extract{...} (the job's own options, and what
                          changes a feature's last bits: device, precision, threads_per_worker,
                          batch; a resume must match them)
    crops/features        (N, C, D) float16, one chunk = chunk_images whole images, Blosc zstd
    crops/boxes           (C, 4) float32, fractional x0, y0, x1, y1 in the training view
    images/path           (N,) str; empty ("") only in rows an interrupted append left, which
                          the next append writes again (FeatureStore.append)
    images/status         (N,) uint8, Status
    images/error          (N,) str, one line per failed image
    images/size           (N, 2) int32, original height, width
    images/pixels         (N, S, S, 3) uint8, optional: the student's input view
    images/hash           (N,) str, blake2b-128 (hex) of the image file's bytes; "" not hashed
                          (unreadable, or a row of a store made before version 4)
    images/duplicate_of   (N,) int64, the first row whose file has the same bytes, -1 none: the
                          row holds a copy of that row's features, status, error, size, pixels
    images/meta           (N,) str, optional: each image's metadata from its listing, a JSON
                          object ("" none): a WebDataset key's .json/.txt, a table's other columns
    text/<vocab>          attrs {"current": <generation>}: the one vocabulary readers see
    text/<vocab>/<generation>/names       (K,) str
    text/<vocab>/<generation>/embeddings  (K, D) float32, templates and teacher in attrs
    crops/int8            (N, C, D) int8, optional (`store compact --to int8`): round(f / scale)
    crops/int8_scale      (N, C) float16, its per-vector scale max|f| / 127; NaN = not written
    crops/pq_codes        (N, C, M) uint8, optional (`store compact --to pq`): the PQ codes of f / |f|
    crops/pq_norm         (N, C) float16, |f| per vector; NaN = not written
    crops/pq_codebook     (M, K, D / M) float32, the centroids of each sub-vector (K <= 256)

Every per-image array is chunked along N by the same chunk_images, so a chunk index names the same
images in all of them and a writer of chunk i touches no byte of chunk j. A chunk is written
features first, status last: a chunk whose status is not pending is complete.

Compact targets (version 3) are derived from crops/features and never replace it: a chunk of
one is complete when its scale (norm) rows hold no NaN, written after the codes; `write_chunk`
sets them back to NaN before it rewrites a chunk's features, so a compact never goes stale
silently. zeroseg.stores.compact writes and decodes them.

Version 4 adds images/hash and images/duplicate_of: the same bytes are embedded once.

`zeroseg store migrate` (zeroseg.stores.migrate) makes a version-1, -2 or -3 store version 4 in place.

Version 2 adds a crc32c checksum after the compressor of every array, so
that reading a damaged chunk fails instead of returning wrong numbers; reads go through
`StoreArray`, which names the damaged chunk in one line. Version 1 stores (no checksums, no
record of threads/device/precision) are still opened, read and resumed.

zeroseg creates a store only where nothing is, or in an empty folder; `STORE/zeroseg.creating`
is written first and removed last, so a folder holding it is an interrupted create of ours, redone
by the next `create`. Anything else at STORE is refused and left untouched.

This module and zeroseg.stores.features (which reads and writes the arrays; compact.py and
export.py for compact targets and exports) are the only code that knows this layout: everything
else goes through FeatureStore.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any

from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec

import zeroseg

SCHEMA_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
# Checksummed after compression: a flipped byte or a truncated chunk file fails the read.
CHECKED = [Crc32cCodec()]
COMPRESSED = [BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.bitshuffle), Crc32cCodec()]
CREATING_MARKER = "zeroseg.creating"  # written first and removed last by FeatureStore.create
# Everything `create` puts in a store folder (with the lock, which the job holds meanwhile).
OUR_ENTRIES = {"zarr.json", "crops", "images", "text", CREATING_MARKER}
# Compact targets: kind -> (codes array, per-vector scale or norm array: NaN until the chunk is written).
COMPACT_ARRAYS = {"int8": ("crops/int8", "crops/int8_scale"), "pq": ("crops/pq_codes", "crops/pq_norm")}
PQ_CODEBOOK = "crops/pq_codebook"
MIGRATING_DIR = "zeroseg.migrating"  # `store migrate` stages a version-1 store's rewritten arrays here
# Version 4: which rows hold the same bytes (FeatureStore.create makes them, `store migrate` adds them).
DEDUP_ARRAYS = ("images/hash", "images/duplicate_of")
PER_IMAGE_ARRAYS = ("crops/features", "images/pixels", "images/size", "images/error", "images/status", "images/path")


class Status(enum.IntEnum):
    PENDING = 0
    OK = 1
    FAILED = 2


@dataclass(frozen=True)
class TeacherInfo:
    """What identifies the teacher that made the features."""

    arch: str
    pretrained: str
    sha256: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    embed_dim: int

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TeacherInfo:
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})


@dataclass(frozen=True)
class StoreConfig:
    """Everything that fixes the meaning of the stored features; two stores with equal configs
    hold comparable features."""

    teacher: TeacherInfo
    grids: tuple[int, ...] = (1, 2, 3, 4)
    view_size: int = 224
    chunk_images: int = 64
    pixels: bool = False

    @property
    def n_crops(self) -> int:
        return sum(g * g for g in self.grids)

    def to_attrs(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "teacher": dataclasses.asdict(self.teacher),
            "grids": list(self.grids),
            "view_size": self.view_size,
            "chunk_images": self.chunk_images,
            "pixels": self.pixels,
            "dtype": "float16",
            "zeroseg_version": zeroseg.__version__,
        }

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> StoreConfig:
        return cls(
            teacher=TeacherInfo.from_dict(attrs["teacher"]),
            grids=tuple(attrs["grids"]),
            view_size=attrs["view_size"],
            chunk_images=attrs["chunk_images"],
            pixels=attrs["pixels"],
        )


def config_mismatches(want: StoreConfig, have: StoreConfig) -> list[str]:
    """Fields that change the meaning of the features ("teacher.arch: a != b"); chunking and
    pixels don't, so they are not compared."""
    pairs = [
        ("teacher.arch", want.teacher.arch, have.teacher.arch),
        ("teacher.pretrained", want.teacher.pretrained, have.teacher.pretrained),
        ("teacher.sha256", want.teacher.sha256[:12], have.teacher.sha256[:12]),
        ("grids", ",".join(map(str, want.grids)), ",".join(map(str, have.grids))),
        ("view_size", want.view_size, have.view_size),
    ]
    return [f"{name}: asked {a}, store has {b}" for name, a, b in pairs if a != b]
