"""Images in: IMAGES -> the list of paths a store will hold, and each path decoded once."""

from __future__ import annotations

import glob
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

from zeroseg.decode import Decoded, decode_image, is_url
from zeroseg.errors import UserError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
GLOB_CHARS = set("*?[")


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
        paths.append(line if is_url(line) else os.path.abspath(base / line))
    return paths
