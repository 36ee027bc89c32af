"""`zeroseg store info|verify`: what a feature store holds, and whether it is sound.

Both read the features out of core: Dask over the store's own chunks (whole images each), so a
store bigger than memory is checked chunk by chunk.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import dask
import dask.array as da
import fsspec
import numpy as np

from zeroseg.geometry import grid_boxes
from zeroseg.stores.features import FeatureStore, Status


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
    return {
        "url": url,
        "images": n,
        "status": {s.name.lower(): int((status == s).sum()) for s in Status},
        "features": {"shape": [n, c, d], "dtype": str(store.features.dtype),
                     "chunks": list(store.features.chunks), "n_chunks": store.n_chunks},
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
        "teacher": dataclasses.asdict(store.config.teacher),
        "grids": list(store.config.grids),
        "view_size": store.config.view_size,
        "vocabularies": store.vocabularies(),
        "extract": store.extract_options,
    }


def grid_levels(grids) -> list[tuple[int, slice]]:
    """(g, slice of the crop axis) for each grid level."""
    out, start = [], 0
    for g in grids:
        out.append((g, slice(start, start + g * g)))
        start += g * g
    return out


def verify_store(url: str) -> tuple[dict[str, Any], list[str]]:
    """Check every image's features against its status. Returns (feature norms per grid level
    over ok images, problems); no problems means the store is complete and sound."""
    store = FeatureStore.open(url)
    status, errors, sizes, paths = store.status(), store.errors(), store.sizes(), store.paths()
    f = da.from_zarr(store.features)  # (N, C, D) float16, one Dask chunk per store chunk
    finite = da.isfinite(f).all(axis=2)  # (N, C)
    zero_row = (f == 0).all(axis=2)  # (N, C)
    norms = da.sqrt((f.astype(np.float32) ** 2).sum(axis=2))  # (N, C)
    levels = grid_levels(store.config.grids)
    per_level = [(norms[:, sl].min(axis=1), norms[:, sl].mean(axis=1), norms[:, sl].max(axis=1)) for _, sl in levels]
    nonfinite, any_zero, all_zero, per_level = dask.compute(
        ~finite.all(axis=1), zero_row.any(axis=1), zero_row.all(axis=1), per_level
    )

    ok, failed, pending = status == Status.OK, status == Status.FAILED, status == Status.PENDING
    problems: list[str] = []

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
    if not np.allclose(store.boxes, grid_boxes(store.config.grids)):
        problems.append(f"crops/boxes do not match grids {store.config.grids}")

    norms_report = {}
    for (g, _), (lo, mean, hi) in zip(levels, per_level):
        if ok.any():
            norms_report[f"{g}x{g}"] = {"min": float(lo[ok].min()), "mean": float(mean[ok].mean()),
                                        "max": float(hi[ok].max())}
    return {"images": len(status), "ok": int(ok.sum()), "norms": norms_report}, problems


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def format_info(info: dict[str, Any]) -> str:
    t, b, f = info["teacher"], info["bytes"], info["features"]
    status = ", ".join(f"{n} {name}" for name, n in info["status"].items())
    per_image = b["features_per_image"]
    ratio = f" ({b['raw_float16_per_image'] / per_image:.2f}x smaller than raw float16)" if per_image else ""
    lines = [
        f"store     {info['url']}",
        f"images    {info['images']}: {status}",
        f"features  {tuple(f['shape'])} {f['dtype']}, chunks {tuple(f['chunks'])} ({f['n_chunks']} chunks)",
        f"pixels    {tuple(info['pixels']) if info['pixels'] else 'not stored'}",
        f"teacher   {t['arch']} ({t['pretrained']}, sha256 {t['sha256'][:12]}), input {t['input_size']} px, {t['embed_dim']} dims",
        f"grids     {','.join(map(str, info['grids']))}, view {info['view_size']} px",
        f"on disk   {_mb(b['on_disk'])} in all, {_mb(b['per_image'])} per written image",
        f"          features {_mb(per_image)} per image, raw float16 {_mb(b['raw_float16_per_image'])}{ratio}",
        f"text      {', '.join(info['vocabularies']) or 'no vocabularies'}",
    ]
    return "\n".join(lines)


def format_norms(report: dict[str, Any]) -> str:
    lines = ["feature norms of ok images per grid level:"]
    for level, n in report["norms"].items():
        lines.append(f"  {level}: min {n['min']:.3f}  mean {n['mean']:.3f}  max {n['max']:.3f}")
    return "\n".join(lines) if report["norms"] else "no ok images"
