"""The feature store's schema: its layout, attributes, codecs and versions (DESIGN.md, "Store schema").

Layout of a version-5 store (a Zarr v3 group):

    attrs                 schema_version, teacher{...}, grids, view_size, dtype, chunk_images,
                          pixels, zeroseg_version, extract{...} (the job's own options, and what
                          changes a feature's last bits: device, precision, threads_per_worker,
                          batch; a resume must match them), teachers{key: {teacher, extract}}
                          (the added teachers, version 5; absent or {} when there are none)
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
    teachers/<key>/features  (N, C, D_key) float16, an added teacher's features of the same rows
                          and crops, chunked and compressed like crops/features
    teachers/<key>/status    (N,) uint8, Status of that teacher's rows, written last per chunk
    teachers/<key>/error     (N,) str, one line per row failed for that teacher
    teachers/<key>/text/<vocab>  the teacher's own vocabularies, laid out like text/<vocab>

Every per-image array is chunked along N by the same chunk_images, so a chunk index names the same
images in all of them and a writer of chunk i touches no byte of chunk j. A chunk is written
features first, status last: a chunk whose status is not pending is complete.

Compact targets (version 3) are derived from crops/features and never replace it: a chunk of
one is complete when its scale (norm) rows hold no NaN, written after the codes; `write_chunk`
sets them back to NaN before it rewrites a chunk's features, so a compact never goes stale
silently. zeroseg.stores.compact writes and decodes them.

Version 4 adds images/hash and images/duplicate_of: the same bytes are embedded once.

Version 5 adds teachers beside the first (`extract --teacher B` on a store made with A). The
first teacher stays where it was (crops/features, images/status, images/error, text/): a version-4
reader's arrays are unchanged. Each added teacher has a key (`teacher_key`: its architecture,
weights' name and the start of their sha256, filesystem-safe; the first teacher has one too) and
its own features, status and error arrays under teachers/<key>/, for the same rows and crop boxes
as the first; paths, sizes, pixels, hashes and duplicate_of are shared. Its TeacherInfo and
extract options are in attrs["teachers"][key], written after its arrays, so a teacher exists once
its arrays do. A chunk of an added teacher is written like one of the first (features and error
first, its status last), only once the first teacher's rows are all done: a row failed for the
first teacher (its image did not decode) is a failed row for every teacher, with the same error.
Compact targets are the first teacher's only (an export reads any teacher, as every reader does).

`zeroseg store migrate` (zeroseg.stores.migrate) makes a version-1 to -4 store version 5 in place.

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
import re
from dataclasses import dataclass
from typing import Any

from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec

import zeroseg

SCHEMA_VERSION = 5
READABLE_VERSIONS = (1, 2, 3, 4, 5)
# Checksummed after compression: a flipped byte or a truncated chunk file fails the read.
CHECKED = [Crc32cCodec()]
COMPRESSED = [BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.bitshuffle), Crc32cCodec()]
# Crop features are stored raw (then checksummed): float16 embeddings compressed only 1.04-1.17x
# with Blosc zstd bit-shuffle (`zeroseg store info` of the toy teacher's quality-run store; the
# random-init zeroseg-tiny's in benchmarks/README.md), and raw chunk files can be mapped and read by
# row in place (stores/mapped.py), which an index re-ranking from the store needs. Stores written
# before keep their compressed features and are read either way.
FEATURE_CODECS = CHECKED
CREATING_MARKER = "zeroseg.creating"  # written first and removed last by FeatureStore.create
# Everything `create` puts in a store folder (with the lock, which the job holds meanwhile).
OUR_ENTRIES = {"zarr.json", "crops", "images", "text", "teachers", CREATING_MARKER}
# Compact targets: kind -> (codes array, per-vector scale or norm array: NaN until the chunk is written).
COMPACT_ARRAYS = {"int8": ("crops/int8", "crops/int8_scale"), "pq": ("crops/pq_codes", "crops/pq_norm")}
PQ_CODEBOOK = "crops/pq_codebook"
MIGRATING_DIR = "zeroseg.migrating"  # `store migrate` stages a version-1 store's rewritten arrays here
# Version 4: which rows hold the same bytes (FeatureStore.create makes them, `store migrate` adds them).
DEDUP_ARRAYS = ("images/hash", "images/duplicate_of")
# An added teacher's own arrays, each in place of the first teacher's (schema version 5).
TEACHER_ARRAYS = {"crops/features": "features", "images/status": "status", "images/error": "error"}
TEACHERS_GROUP = "teachers"
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


def teacher_key(teacher: TeacherInfo) -> str:
    """A teacher's short, filesystem-safe name in a store: its architecture, the name of its
    weights (a file's stem, a tag, random-SEED) and the first 8 hex digits of their sha256, so
    that two weights under one name still get two keys."""
    weights = re.sub(r"\.[A-Za-z0-9]+$", "", teacher.pretrained.replace("\\", "/").rsplit("/", 1)[-1])
    name = f"{teacher.arch}-{weights}-{teacher.sha256[:8]}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")


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


def config_mismatches(want: StoreConfig, have: StoreConfig, teacher: bool = True) -> list[str]:
    """Fields that change the meaning of the features ("teacher.arch: a != b"); chunking and
    pixels don't, so they are not compared. `teacher=False` compares what every teacher of a
    store shares (grids, view size): another teacher is added beside, not refused."""
    pairs = [
        ("teacher.arch", want.teacher.arch, have.teacher.arch),
        ("teacher.pretrained", want.teacher.pretrained, have.teacher.pretrained),
        ("teacher.sha256", want.teacher.sha256[:12], have.teacher.sha256[:12]),
    ] if teacher else []
    pairs += [
        ("grids", ",".join(map(str, want.grids)), ",".join(map(str, have.grids))),
        ("view_size", want.view_size, have.view_size),
    ]
    return [f"{name}: asked {a}, store has {b}" for name, a, b in pairs if a != b]
