"""`zeroseg store info|verify [--repair]`: what a feature store holds, and whether it is sound.

`verify` reads every chunk of every per-image array, one store chunk (whole images) at a time, so
a store bigger than memory is checked out of core. A chunk that cannot be read back (a checksum
mismatch, a truncated file) is named; `--repair` marks such chunks pending, so that re-running
`extract` redoes exactly them.
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np

from zeroseg.geometry import grid_boxes, grid_levels
from zeroseg.stores.compact import compact_kinds, compact_report, mark_unwritten
from zeroseg.stores.features import DamagedChunkError, FeatureStore, StoreArray
from zeroseg.stores.schema import COMPACT_ARRAYS, PER_IMAGE_ARRAYS, PQ_CODEBOOK, TEACHER_ARRAYS, Status
from zeroseg.stores.lock import StoreLock


def _disk_bytes(url: str, sub: str = "") -> int:
    fs, path = fsspec.core.url_to_fs(url)
    path = path.rstrip("/") + ("/" + sub if sub else "")
    return int(fs.du(path)) if fs.exists(path) else 0


def store_info(url: str) -> dict[str, Any]:
    """Counts by status, shape, dtype, chunking, bytes on disk, teacher and grids."""
    store = FeatureStore.open(url)
    status = store.status()
    n, c, d = store.features.shape
    total = _disk_bytes(url)
    features = _disk_bytes(url, "crops/features")
    written = int((status != Status.PENDING).sum())
    raw = c * d * 2  # float16
    compact = {}
    for kind, state in compact_kinds(store).items():
        size = sum(_disk_bytes(url, name) for name in COMPACT_ARRAYS[kind])  # codes and scales
        codebook = _disk_bytes(url, PQ_CODEBOOK) if kind == "pq" else 0  # a fixed cost, not per image
        compact[kind] = {"state": state, "bytes": size, "codebook_bytes": codebook,
                         "per_image": round(size / written) if written else None}
    return {
        "url": url,
        "images": n,
        "status": {s.name.lower(): int((status == s).sum()) for s in Status},
        # rows holding the same bytes as an earlier row: embedded once, copied (None: not recorded)
        "duplicates": int((store.duplicate_of() >= 0).sum()) if store.has_dedup else None,
        "features": {"shape": [n, c, d], "dtype": str(store.features.dtype),
                     "chunks": list(store.features.chunks), "n_chunks": store.n_chunks,
                     "raw": store.features.is_raw()},
        "pixels": list(store.pixels.shape) if store.has_pixels else None,
        "bytes": {
            "on_disk": total,
            "features": features,
            "pixels": _disk_bytes(url, "images/pixels") if store.has_pixels else 0,
            # per image written so far (pending chunks take no space)
            "per_image": round(total / written) if written else None,
            "features_per_image": round(features / written) if written else None,
            "raw_float16_per_image": raw,
        },
        "teacher": {"key": store.teacher_key, **dataclasses.asdict(store.config.teacher)},
        # teachers added beside the first (schema 5): their own features of the same rows
        "added_teachers": [_added_teacher_info(url, key, written) for key in store.added_teachers],
        "grids": list(store.config.grids),
        "view_size": store.config.view_size,
        "compact": compact,
        "vocabularies": store.vocabularies(),
        "extract": store.extract_options,
    }


def _added_teacher_info(url: str, key: str, written: int) -> dict[str, Any]:
    store = FeatureStore.open(url, teacher=key)
    status = store.status()
    features = _disk_bytes(url, store.features.name)
    return {"key": key, **dataclasses.asdict(store.config.teacher),
            "status": {s.name.lower(): int((status == s).sum()) for s in Status},
            "features_per_image": round(features / written) if written else None,
            "vocabularies": store.vocabularies()}


@dataclass
class Damage:
    array: str
    chunk: int
    rows: slice  # the images of the chunk
    message: str  # DamagedChunkError's line

    @property
    def where(self) -> str:
        return f"{self.array} chunk {self.chunk} (images {self.rows.start}-{self.rows.stop - 1})"


def _read_chunked(arr: StoreArray, fill, damage: list[Damage]) -> np.ndarray:
    """The whole (small) array, chunk by chunk; a damaged chunk's rows hold `fill` and are noted."""
    out = np.full(arr.shape, fill, dtype=arr.dtype if arr.dtype.kind in "fiub" else object)
    for chunk in range(-(-arr.shape[0] // arr.chunks[0])):
        try:
            out[arr.chunk_rows(chunk)] = arr.read_chunk(chunk)
        except DamagedChunkError as e:
            damage.append(Damage(arr.name, chunk, arr.chunk_rows(chunk), str(e)))
    return out


def verify_store(url: str, teacher: str | None = None) -> tuple[dict[str, Any], list[str], list[Damage]]:
    """Read every chunk of every per-image array and check each image's features against its
    status, those of the store's `teacher` (None: its first). Returns (feature norms per grid
    level over ok images, problems, damaged chunks); no problems means the store is complete and
    sound. Rows of a damaged chunk are left out of the other checks (the damage is the problem there)."""
    store = FeatureStore.open(url, teacher=teacher)
    damage: list[Damage] = []
    status = _read_chunked(store.array("images/status"), 255, damage)
    errors = _read_chunked(store.array("images/error"), "", damage)
    sizes = _read_chunked(store.array("images/size"), 0, damage)
    paths = _read_chunked(store.array("images/path"), "?", damage)
    if store.has_pixels:
        for chunk in range(store.n_chunks):  # read to check, not kept
            try:
                store.pixels.read_chunk(chunk)
            except DamagedChunkError as e:
                damage.append(Damage("images/pixels", chunk, store.chunk_slice(chunk), str(e)))
    levels = grid_levels(store.config.grids)
    n = len(status)
    # Copies (images/duplicate_of) must hold their first row's features bit for bit: a digest of
    # each row that is a copy or copied, taken as its chunk is read.
    dup = _read_chunked(store.array("images/duplicate_of"), -1, damage) if store.has_dedup else np.full(n, -1)
    copied = np.zeros(n, bool)
    copied[dup >= 0] = True
    copied[dup[(dup >= 0) & (dup < n)]] = True
    digest: dict[int, int] = {}
    readable = np.ones(n, bool)
    nonfinite, any_zero, all_zero = np.zeros(n, bool), np.zeros(n, bool), np.zeros(n, bool)
    per_level = np.zeros((len(levels), 3, n), np.float32)  # (level, min/mean/max, image)
    for chunk in range(store.n_chunks):
        sl = store.chunk_slice(chunk)
        try:
            f = store.features.read_chunk(chunk)  # (b, C, D) float16
        except DamagedChunkError as e:
            damage.append(Damage(store.features.name, chunk, sl, str(e)))
            readable[sl] = False
            continue
        for r in np.flatnonzero(copied[sl]):
            digest[sl.start + int(r)] = zlib.crc32(np.ascontiguousarray(f[r]).tobytes())
        zero_row = (f == 0).all(axis=2)
        nonfinite[sl], any_zero[sl], all_zero[sl] = ~np.isfinite(f).all(axis=(1, 2)), zero_row.any(1), zero_row.all(1)
        norms = np.sqrt((f.astype(np.float32) ** 2).sum(axis=2))  # (b, C)
        for j, (_, crops) in enumerate(levels):
            per_level[j, :, sl] = norms[:, crops].min(1), norms[:, crops].mean(1), norms[:, crops].max(1)
    for d in damage:  # rows of a damaged chunk in any array
        readable[d.rows] = False

    ok = (status == Status.OK) & readable
    failed = (status == Status.FAILED) & readable
    pending = (status == Status.PENDING) & readable
    problems: list[str] = [d.message for d in sorted(damage, key=lambda d: (d.chunk, d.array))]

    def check(bad: np.ndarray, what: str) -> None:
        if bad.any():
            rows = np.flatnonzero(bad)
            shown = ", ".join(f"{i} {paths[i]}" for i in rows[:3])
            problems.append(f"{len(rows)} {what} (e.g. {shown})")

    check(pending, "images still pending: the job did not finish; re-run the same extract command")
    check(ok & nonfinite, "ok images with NaN or inf features")
    check(ok & any_zero & ~nonfinite, "ok images with an all-zero crop feature")
    check(failed & ~all_zero, "failed images with non-zero features")
    check(failed & (errors == ""), "failed images without a reason in images/error")
    check(ok & (errors != ""), "ok images with a reason in images/error")
    check(ok & (sizes.min(axis=1) <= 0), "ok images without an original size")
    bad_copy = np.zeros(n, bool)
    for i in np.flatnonzero(dup >= 0):
        j = dup[i]
        if j >= i or readable[i] and readable[j] and (status[i] != status[j] or digest.get(i) != digest.get(j)):
            bad_copy[i] = True
    check(bad_copy, "copies whose features or status differ from their first row's (images/duplicate_of)")
    for chunk in sorted({int(r) // store.config.chunk_images for i in np.flatnonzero(bad_copy)
                        for r in (i, dup[i]) if r < n}):
        # the copy's chunk and its first row's: `--repair` marks both pending, and extract redoes the
        # first row, then the copy from it (damage by content, not by checksum)
        damage.append(Damage(store.features.name, chunk, store.chunk_slice(chunk),
                             f"{store.features.name} chunk {chunk}: copies disagree with their first rows"))
    try:
        if not np.allclose(store.boxes, grid_boxes(store.config.grids)):
            problems.append(f"crops/boxes do not match grids {store.config.grids}")
    except DamagedChunkError as e:
        damage.append(Damage("crops/boxes", 0, slice(0, 0), str(e)))
        problems.append(str(e))

    norms_report = {}
    for (g, _), (lo, mean, hi) in zip(levels, per_level):
        if ok.any():
            norms_report[f"{g}x{g}"] = {"min": float(lo[ok].min()), "mean": float(mean[ok].mean()),
                                        "max": float(hi[ok].max())}
    report = {"images": n, "ok": int(ok.sum()), "norms": norms_report}
    if not damage and not store.is_added_teacher:  # compact targets are the first teacher's
        report["compact"] = compact_report(store)  # cosine of int8 / PQ targets to the fp16 features
        for kind, c in report["compact"].items():
            for chunk, message in c["damaged"].items():
                damage.append(Damage(COMPACT_ARRAYS[kind][0], chunk, store.chunk_slice(chunk), message))
                problems.append(f"{message.split(': run ')[0]}: `--repair` marks it unwritten, then "
                                f"`zeroseg store compact {url} --to {kind}` writes it again")
    return report, problems, damage


def repair_store(url: str, damage: list[Damage], teacher: str | None = None) -> tuple[list[int], list[str]]:
    """Mark every chunk with damaged per-image data pending (its status rows rewritten whole), so
    that re-running `extract` redoes it; rewrite damaged crop boxes from the grids. Damage found
    through an added `teacher` marks its own chunk pending when its own features, status or error
    are damaged, the first teacher's when shared data (sizes, pixels) are. Returns (the chunks
    marked pending, what cannot be repaired here). Holds the store's lock meanwhile."""
    cannot = [f"{d.where} cannot be repaired: it is the store's own list of images; extract into a new STORE"
              for d in damage if d.array == "images/path"]
    with StoreLock(url):
        store = FeatureStore.open(url, mode="r+", teacher=teacher)
        own = {store.array(name).name for name in TEACHER_ARRAYS}
        redo = set()
        for d in damage:
            if d.array in own or d.array in PER_IMAGE_ARRAYS and d.array != "images/path":
                (store if d.array in own else store.first_teacher()).mark_pending(d.chunk)
                redo.add(d.chunk)
        redo = sorted(redo)
        for kind, (codes, _) in COMPACT_ARRAYS.items():
            for d in damage:
                if d.array == codes:  # derived data: `compact` writes it again
                    mark_unwritten(store, kind, d.chunk)
        if any(d.array == "crops/boxes" for d in damage):
            store.group["crops/boxes"][:] = grid_boxes(store.config.grids)
    return redo, cannot


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def format_info(info: dict[str, Any]) -> str:
    t, b, f = info["teacher"], info["bytes"], info["features"]
    status = ", ".join(f"{n} {name}" for name, n in info["status"].items())
    per_image = b["features_per_image"]
    if f["raw"]:
        ratio = " (stored raw: an index re-ranks from them in place)"
    else:
        ratio = (f" ({b['raw_float16_per_image'] / per_image:.2f}x smaller than raw float16, compressed: "
                 "`zeroseg store migrate` stores them raw)") if per_image else ""
    lines = [
        f"store     {info['url']}",
        f"images    {info['images']}: {status}",
        f"          {info['duplicates']} duplicates (the same bytes as an earlier row: embedded once)"
        if info["duplicates"] is not None else "          duplicates not recorded (schema before 4: `zeroseg store migrate`)",
        f"features  {tuple(f['shape'])} {f['dtype']}, chunks {tuple(f['chunks'])} ({f['n_chunks']} chunks)",
        f"pixels    {tuple(info['pixels']) if info['pixels'] else 'not stored'}",
        f"teacher   {t['key']}: {t['arch']} ({t['pretrained']}, sha256 {t['sha256'][:12]}), input {t['input_size']} px, "
        f"{t['embed_dim']} dims",
        f"grids     {','.join(map(str, info['grids']))}, view {info['view_size']} px",
        f"on disk   {_mb(b['on_disk'])} in all, {_mb(b['per_image'])} per written image",
        f"          features {_mb(per_image)} per image, raw float16 {_mb(b['raw_float16_per_image'])}{ratio}",
        f"text      {', '.join(info['vocabularies']) or 'no vocabularies'}",
    ]
    for a in info["added_teachers"]:  # `--teacher-key KEY` picks one for train, index build, ablate, text
        counts = ", ".join(f"{n} {name}" for name, n in a["status"].items())
        lines.append(f"teacher   {a['key']}: {a['arch']} ({a['pretrained']}, sha256 {a['sha256'][:12]}), "
                     f"input {a['input_size']} px, {a['embed_dim']} dims; {counts}; "
                     f"features {_mb(a['features_per_image'])} per image; text {', '.join(a['vocabularies']) or 'none'}")
    for kind, c in info["compact"].items():
        ratio = f" ({c['per_image'] / per_image:.2f}x the fp16 features)" if per_image and c["per_image"] else ""
        codebook = f", codebook {_mb(c['codebook_bytes'])}" if c["codebook_bytes"] else ""
        lines.append(f"{kind:<10}{_mb(c['per_image'])} per image{ratio}{codebook}, {c['state']}")
    return "\n".join(lines)


def format_norms(report: dict[str, Any]) -> str:
    lines = ["feature norms of ok images per grid level:"]
    for level, n in report["norms"].items():
        lines.append(f"  {level}: min {n['min']:.3f}  mean {n['mean']:.3f}  max {n['max']:.3f}")
    return "\n".join(lines) if report["norms"] else "no ok images"
