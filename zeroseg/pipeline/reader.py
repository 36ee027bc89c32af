"""Images in: IMAGES -> the list of paths a store will hold, and each path decoded once.

IMAGES comes in three formats (`list_inputs`):
- files: a folder, a glob, one image or a manifest (`list_images`);
- webdataset: tar shards as img2dataset writes them (`shards/{00000..00009}.tar`, a glob, one
  shard, or a manifest listing shards; local paths or fsspec URLs). Each image member is a row
  named by its member key `SHARD#MEMBER@OFFSET+SIZE` (zeroseg.decode.member_key): listing reads
  each shard's headers once, front to back, and never unpacks it; a worker then reads each row's
  bytes with one ranged read, and the rows of a chunk are neighbouring members of one shard.
  The `.json` and `.txt` members of an image's key are kept as its metadata. A key with no image
  member is one row (its first member) that fails as "not an image".
- table: a Parquet or CSV table whose `path_column` holds the paths; its other columns are kept
  as each row's metadata.
A row's metadata is one JSON object (text), "" for none.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import fsspec

from zeroseg.decode import TAR_BLOCK, Decoded, decode_image, is_url, member_key
from zeroseg.errors import UserError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
GLOB_CHARS = set("*?[")
INPUT_FORMATS = ("auto", "files", "webdataset", "table")
METADATA_EXTENSIONS = ("json", "txt")  # members kept as their key's metadata
TABLE_SUFFIXES = (".parquet", ".csv")
BRACES = re.compile(r"\{([^{}]*)\}")
LISTING_THREADS = 8  # shards listed at once: remote listing waits on the network, not the CPU


@dataclass
class Listing:
    """What IMAGES names: one store row per path, each row's metadata ("" none; None when no row
    has any), and notes on damaged inputs that were listed as far as they go (a truncated shard)."""

    paths: list[str]
    metadata: list[str] | None = None
    notes: list[str] = field(default_factory=list)


def list_inputs(images: str, input_format: str = "auto", path_column: str = "path") -> Listing:
    """The rows of IMAGES in `input_format` (see the module docstring); "auto" reads a brace
    pattern or a .tar as webdataset, a .parquet or .csv as a table, anything else as files."""
    if input_format not in INPUT_FORMATS:
        raise UserError(f"--input-format {input_format}: choose {', '.join(INPUT_FORMATS)}")
    if input_format == "auto":
        lower = images.lower()
        input_format = ("webdataset" if BRACES.search(images) or lower.endswith(".tar")
                        else "table" if lower.endswith(TABLE_SUFFIXES) else "files")
    if input_format == "webdataset":
        return _list_webdataset(images)
    if input_format == "table":
        return _list_table(images, path_column)
    return Listing(list_images(images))


def list_images(images: str) -> list[str]:
    """The paths IMAGES names, one row of the store per listed path. IMAGES is one of:
    - a folder: every file under it (recursively) with an image extension, sorted;
    - a glob (`photos/**/*.jpg`): every file it matches, sorted, whatever the extension;
    - one image file;
    - a manifest file (any other file): one path or URL per line (blank lines and `# comments`
      skipped), or a `.jsonl` manifest whose objects carry an `image` key (what `zeroseg scenes`
      writes). A manifest's order is kept: the user chose it, and row i of the store is line i.
    Relative paths in a manifest are relative to the manifest's folder. Local paths are made
    absolute so a store can be resumed from any working directory. Duplicates are kept: the same
    file listed twice is two rows. Raises UserError for a path that does not exist or lists nothing."""
    path = Path(images)
    if path.is_dir():
        paths = sorted(
            os.path.abspath(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        what = f"folder {images} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})"
    elif path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
        paths = [os.path.abspath(path)]  # one image
        what = ""
    elif path.is_file():
        paths = _read_manifest(path)
        what = f"manifest {images} lists no images"
    elif GLOB_CHARS & set(images):
        paths = sorted(os.path.abspath(p) for p in glob.glob(images, recursive=True) if os.path.isfile(p))
        what = f"glob {images} matches no files"
    else:
        raise UserError(f"IMAGES {images} does not exist (give a folder, a glob or a manifest file)")
    if not paths:
        raise UserError(what)
    return paths


def read_views(paths: Sequence[str], view_size: int, grids: Sequence[int],
               decoder: ThreadPoolExecutor | None = None) -> Iterator[Decoded]:
    """Each path's training view (or why it has none), in order. With a `decoder` thread,
    decoding runs ahead of whoever consumes the views."""
    decode = lambda path: decode_image(path, view_size, grids)  # noqa: E731
    return decoder.map(decode, paths) if decoder else map(decode, paths)


def expand_braces(pattern: str) -> list[str]:
    """`a{00..02}b{x,y}` -> a00bx, a00by, a01bx, ... (ranges keep the width of their first bound)."""
    found = BRACES.search(pattern)
    if not found:
        return [pattern]
    inner = found[1]
    numbers = re.fullmatch(r"(\d+)\.\.(\d+)", inner)
    if numbers:
        lo, hi = numbers[1], numbers[2]
        options = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    else:
        options = inner.split(",")
    head, tail = pattern[: found.start()], pattern[found.end():]
    return [head + option + rest for option in options for rest in expand_braces(tail)]


def list_shards(images: str) -> list[str]:
    """The shards IMAGES names: a brace pattern, a glob, one .tar, or a manifest of shards."""
    if BRACES.search(images):
        shards = expand_braces(images)
    elif GLOB_CHARS & set(images):
        fs, _ = fsspec.core.url_to_fs(images)
        shards = sorted(fs.unstrip_protocol(p) if is_url(images) else p for p in fs.glob(images))
    elif images.lower().endswith(".tar"):
        shards = [images]
    elif Path(images).is_file():
        shards = _read_manifest(Path(images))
    else:
        raise UserError(f"IMAGES {images} names no shards (give a brace pattern, a glob, a .tar or a manifest)")
    if not shards:
        raise UserError(f"{images} names no shards")
    return [s if is_url(s) else os.path.abspath(s) for s in shards]


def _list_webdataset(images: str) -> Listing:
    shards = list_shards(images)
    with ThreadPoolExecutor(LISTING_THREADS) as pool:  # map keeps the shards' order
        listed = list(pool.map(list_shard, shards))
    paths = [path for rows, _ in listed for path, _ in rows]
    metadata = [meta for rows, _ in listed for _, meta in rows]
    notes = [note for _, note in listed if note]
    if not paths:
        raise UserError(f"{images}: its {len(shards)} shards hold no members" + (f" ({notes[0]})" if notes else ""))
    return Listing(paths, metadata if any(metadata) else None, notes)


def _key_and_extension(name: str) -> tuple[str, str]:
    """WebDataset's grouping: `dir/000001.seg.png` -> (`dir/000001`, `seg.png`)."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def list_shard(shard: str) -> tuple[list[tuple[str, str]], str]:
    """One streaming pass over `shard`'s headers: its rows (member key, metadata JSON or "") in
    member order, and a note ("" none) when the shard is missing, no tar, or ends early (the
    members listed before the damage are kept; one cut inside its data fails when decoded)."""
    groups: dict[str, dict] = {}  # key -> {"members": [(name, offset, size)], "images": [...], "meta": {}}
    note = ""
    try:
        with fsspec.open(shard, "rb") as f:
            tar = tarfile.open(fileobj=f, mode="r:")  # uncompressed: reads headers, seeks over data
            try:
                for info in tar:
                    if not info.isfile():
                        continue
                    key, ext = _key_and_extension(info.name)
                    group = groups.setdefault(key, {"members": [], "images": [], "meta": {}})
                    member = (info.name, info.offset_data, info.size)
                    group["members"].append(member)
                    if "." + ext.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS:
                        group["images"].append(member)
                    elif ext.lower() in METADATA_EXTENSIONS:
                        text = tar.extractfile(info).read().decode("utf-8", "replace")
                        group["meta"][ext.lower()] = _json_or_text(text) if ext.lower() == "json" else text
            except (tarfile.ReadError, EOFError) as e:
                note = f"shard {shard} is truncated after {len(groups)} keys ({e}): the rows listed before are kept"
            else:
                f.seek(tar.offset)
                if f.read(2 * TAR_BLOCK) != bytes(2 * TAR_BLOCK):  # tar's end-of-archive marker
                    note = f"shard {shard} is truncated after {len(groups)} keys (no end-of-archive marker): the rows listed before are kept"
    except FileNotFoundError:
        return [], f"shard {shard} does not exist: skipped"
    except tarfile.ReadError as e:
        return [], f"shard {shard} is not a tar file ({e}): skipped"
    rows = []
    for group in groups.values():
        meta = json.dumps(group["meta"], ensure_ascii=False) if group["meta"] else ""
        for name, offset, size in group["images"] or group["members"][:1]:  # no image: its first member fails
            rows.append((member_key(shard, name, offset, size), meta))
    return rows, note


def _json_or_text(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def _list_table(table: str, column: str) -> Listing:
    # pyarrow here, not at the top: its import costs start-up time that other inputs never need
    import pyarrow.csv
    import pyarrow.parquet

    try:
        with fsspec.open(table, "rb") as f:
            data = pyarrow.csv.read_csv(f) if table.lower().endswith(".csv") else pyarrow.parquet.read_table(f)
    except FileNotFoundError:
        raise UserError(f"table {table} does not exist")
    except Exception as e:  # pyarrow's parse errors: a file that is no table of that kind
        raise UserError(f"cannot read table {table}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}")
    if column not in data.column_names:
        raise UserError(f"table {table} has no column {column!r} (columns: {', '.join(data.column_names)}): "
                        "give --path-column")
    base = Path(table).parent
    paths = ["" if p is None else _resolve(base, str(p)) for p in data.column(column).to_pylist()]
    others = data.drop_columns([column])
    metadata = None
    if others.num_columns:
        metadata = [json.dumps(row, ensure_ascii=False, default=str) for row in others.to_pylist()]
    if not paths:
        raise UserError(f"table {table} has no rows")
    return Listing(paths, metadata)


def _resolve(base: Path, path: str) -> str:
    """A listed path: a URL as it is, a local path absolute (relative to the listing's folder)."""
    return path if is_url(path) or not path else os.path.abspath(base / path)


def _read_manifest(manifest: Path) -> list[str]:
    base = manifest.parent
    paths = []
    for number, line in enumerate(manifest.read_text(errors="replace").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if manifest.suffix == ".jsonl":
            try:
                line = json.loads(line)["image"]
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{manifest}:{number}: not a JSON object with an 'image' key")
        paths.append(_resolve(base, line))
    return paths
