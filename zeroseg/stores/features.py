"""The Zarr feature store: the one module that knows its schema (DESIGN.md, "Store schema").

Layout of a version-1 store (a Zarr v3 group):

    attrs                 schema_version, teacher{...}, grids, view_size, dtype, chunk_images,
                          pixels, zeroseg_version, extract{...} (the job's own options)
    crops/features        (N, C, D) float16, one chunk = chunk_images whole images, Blosc zstd
    crops/boxes           (C, 4) float32, fractional x0, y0, x1, y1 in the training view
    images/path           (N,) str
    images/status         (N,) uint8, Status
    images/error          (N,) str, one line per failed image
    images/size           (N, 2) int32, original height, width
    images/pixels         (N, S, S, 3) uint8, optional: the student's input view
    text/<vocab>/names    (K,) str
    text/<vocab>/embeddings (K, D) float32, templates in attrs

Every per-image array is chunked along N by the same chunk_images, so a chunk index names the same
images in all of them and a writer of chunk i touches no byte of chunk j. A chunk is written
features first, status last: a chunk whose status is not pending is complete.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

import zeroseg
from zeroseg.errors import UserError
from zeroseg.geometry import grid_boxes

SCHEMA_VERSION = 1
COMPRESSOR = BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.bitshuffle)


class Status(enum.IntEnum):
    PENDING = 0
    OK = 1
    FAILED = 2


class StoreError(UserError):
    """Missing store, wrong schema, a store made differently than asked."""


class StoreNotFoundError(StoreError):
    """No store at that URL (so one may be created there)."""


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


def _mismatches(want: StoreConfig, have: StoreConfig) -> list[str]:
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


def _zarr_store(url: str, read_only: bool):
    """A plain path or file:// URL is a LocalStore (creates folders as it writes); anything else
    goes through fsspec (memory://, s3://, gs://, ...)."""
    if "://" not in url or url.startswith("file://"):
        path = url[len("file://"):] if url.startswith("file://") else url
        return zarr.storage.LocalStore(path, read_only=read_only)
    return zarr.storage.FsspecStore.from_url(url, read_only=read_only)


class FeatureStore:
    """A handle on one store. Create with `create`, open with `open`; never construct directly."""

    def __init__(self, group: zarr.Group, url: str):
        self.group = group
        self.url = url
        self.config = StoreConfig.from_attrs(dict(group.attrs))

    # ---- create / open -------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        url: str,
        config: StoreConfig,
        paths: Sequence[str],
        extract: dict[str, Any] | None = None,
    ) -> FeatureStore:
        """A new store for `paths`, all pending. Refuses to overwrite an existing store."""
        if not paths:
            raise StoreError("no images to store")
        store = _zarr_store(url, read_only=False)
        try:
            group = zarr.open_group(store, mode="w-", zarr_format=3)
        except (zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError, FileExistsError):
            try:
                unfinished = "schema_version" not in zarr.open_group(store, mode="r").attrs
            except (zarr.errors.GroupNotFoundError, FileNotFoundError):
                unfinished = False
            if not unfinished:
                raise StoreError(f"{url} already holds a store; open it instead of creating one")
            group = zarr.open_group(store, mode="w", zarr_format=3)  # an interrupted create: redo it
        n, c, b, s = len(paths), config.n_crops, config.chunk_images, config.view_size
        d = config.teacher.embed_dim
        group.create_array(
            "crops/features", shape=(n, c, d), chunks=(b, c, d), dtype="float16",
            compressors=COMPRESSOR, fill_value=0,
        )
        group.create_array("crops/boxes", data=grid_boxes(config.grids))
        group.create_array("images/path", shape=(n,), chunks=(b,), dtype=str)
        group["images/path"][:] = np.asarray(paths, dtype=str)
        group.create_array("images/status", shape=(n,), chunks=(b,), dtype="uint8", fill_value=0)
        group.create_array("images/error", shape=(n,), chunks=(b,), dtype=str)
        group.create_array("images/size", shape=(n, 2), chunks=(b, 2), dtype="int32", fill_value=0)
        if config.pixels:
            group.create_array(
                "images/pixels", shape=(n, s, s, 3), chunks=(b, s, s, 3), dtype="uint8",
                compressors=COMPRESSOR, fill_value=0,
            )
        # Attributes last: a group without them is an interrupted create, not a store.
        # One metadata write (attrs.update would write once per key: a reader could see half).
        group.update_attributes({**config.to_attrs(), "extract": extract or {}})
        return cls(group, url)

    @classmethod
    def open(cls, url: str, mode: str = "r", expect: StoreConfig | None = None) -> FeatureStore:
        """Open an existing store; with `expect`, refuse one whose features mean something else."""
        try:
            group = zarr.open_group(_zarr_store(url, read_only=mode == "r"), mode=mode)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            raise StoreNotFoundError(f"no feature store at {url}")
        version = group.attrs.get("schema_version")
        if version is None and not group.attrs:
            raise StoreNotFoundError(f"{url} holds only an unfinished store (its creation was interrupted)")
        if version != SCHEMA_VERSION:
            raise StoreError(
                f"{url}: schema version {version}, this zeroseg reads version {SCHEMA_VERSION}"
            )
        fs = cls(group, url)
        if expect is not None:
            problems = _mismatches(expect, fs.config)
            if problems:
                raise StoreError(f"{url} was made differently: " + "; ".join(problems))
        return fs

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
        return dict(self.group.attrs.get("extract", {}))

    def chunk_slice(self, chunk: int) -> slice:
        b = self.config.chunk_images
        return slice(chunk * b, min((chunk + 1) * b, self.n_images))

    # ---- per-image arrays --------------------------------------------------------------

    @property
    def features(self) -> zarr.Array:
        return self.group["crops/features"]

    @property
    def boxes(self) -> np.ndarray:
        return self.group["crops/boxes"][:]

    @property
    def pixels(self) -> zarr.Array:
        return self.group["images/pixels"]

    def paths(self) -> np.ndarray:
        return self.group["images/path"][:]

    def status(self) -> np.ndarray:
        return self.group["images/status"][:]

    def errors(self) -> np.ndarray:
        return self.group["images/error"][:]

    def sizes(self) -> np.ndarray:
        return self.group["images/size"][:]

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
    ) -> None:
        """Write one whole chunk: data first, status last (that is what makes a chunk complete)."""
        sl = self.chunk_slice(chunk)
        n = sl.stop - sl.start
        if features.shape != (n, self.n_crops, self.dim):
            raise ValueError(f"chunk {chunk}: features {features.shape}, want {(n, self.n_crops, self.dim)}")
        if (np.asarray(status) == Status.PENDING).any():
            raise ValueError(f"chunk {chunk}: every image must end ok or failed")
        self.group["crops/features"][sl] = features.astype(np.float16)
        if self.has_pixels and pixels is not None:
            self.group["images/pixels"][sl] = pixels
        self.group["images/size"][sl] = sizes
        self.group["images/error"][sl] = np.asarray(errors, dtype=str)
        self.group["images/status"][sl] = np.asarray(status, dtype=np.uint8)

    def read_chunk(self, chunk: int) -> dict[str, np.ndarray]:
        sl = self.chunk_slice(chunk)
        out = {
            "features": self.group["crops/features"][sl],
            "status": self.group["images/status"][sl],
        }
        if self.has_pixels:
            out["pixels"] = self.group["images/pixels"][sl]
        return out

    # ---- text vocabularies -------------------------------------------------------------

    def vocabularies(self) -> list[str]:
        return sorted(self.group["text"].group_keys()) if "text" in self.group else []

    def write_text(
        self, vocab: str, names: Sequence[str], embeddings: np.ndarray, templates: Sequence[str]
    ) -> None:
        """Cache a vocabulary's text embeddings (K, D); replaces one of the same name."""
        if embeddings.shape != (len(names), self.dim):
            raise StoreError(
                f"vocabulary {vocab}: embeddings {embeddings.shape}, store wants ({len(names)}, {self.dim})"
            )
        g = self.group.require_group("text").require_group(vocab)
        g.create_array("names", shape=(len(names),), dtype=str, overwrite=True)[:] = np.asarray(names, dtype=str)
        g.create_array("embeddings", data=embeddings.astype(np.float32), overwrite=True)
        g.update_attributes({"templates": list(templates), "teacher": dataclasses.asdict(self.config.teacher)})

    def read_text(self, vocab: str) -> tuple[list[str], np.ndarray]:
        if vocab not in self.vocabularies():
            have = ", ".join(self.vocabularies()) or "none"
            raise StoreError(f"{self.url} has no vocabulary {vocab!r} (has: {have})")
        g = self.group["text"][vocab]
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
