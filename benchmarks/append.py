"""What growing a store costs: extracting a whole listing, against appending 10% more images to
a store of the rest (issue 16: goal append <= 0.15x the whole). Both are timed end to end as a
user runs them (`run_extract` in this process: listing, teacher load, store, hashing, embedding).

    PYTHONPATH=. python benchmarks/append.py --images 640 --chunk-images 64 --teacher zeroseg-tiny

With --images a multiple of --chunk-images plus 10%, the append embeds exactly the new images;
otherwise it also embeds the old rows of the store's last, partly filled chunk again (up to
chunk_images - 1 of them: they are not written, but the new rows' batches are a whole extraction's).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from zeroseg.experiments.scenes import generate_scenes  # noqa: E402
from zeroseg.pipeline.reader import list_images  # noqa: E402
from zeroseg.pipeline.runner import ExtractConfig, run_extract  # noqa: E402


def timed_extract(manifest: Path, url: str, config: ExtractConfig) -> float:
    start = time.perf_counter()
    run_extract(str(manifest), url, config, notify=lambda _: None)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=640, help="images in the store before the append")
    parser.add_argument("--more", type=float, default=0.1, help="the append, as a share of --images")
    parser.add_argument("--chunk-images", type=int, default=64)
    parser.add_argument("--teacher", default="zeroseg-tiny")
    parser.add_argument("--view-size", type=int, default=224)
    args = parser.parse_args()
    more = max(1, round(args.images * args.more))
    config = ExtractConfig(teacher=args.teacher, view_size=args.view_size, chunk_images=args.chunk_images, workers=0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        paths = list_images(str(generate_scenes(work / "scenes", n=args.images + more, split="train", seed=0,
                                                size=args.view_size)))
        first, whole = work / "first.txt", work / "whole.txt"
        first.write_text("".join(f"{p}\n" for p in paths[: args.images]))
        whole.write_text("".join(f"{p}\n" for p in paths))
        timed_extract(first, str(work / "warm-up.zarr"), config)  # imports, file cache, first calls
        shutil.rmtree(work / "warm-up.zarr")
        whole_s = timed_extract(whole, str(work / "whole.zarr"), config)
        timed_extract(first, str(work / "grown.zarr"), config)
        append_s = timed_extract(whole, str(work / "grown.zarr"), config)
    print(f"{args.teacher}, {args.images} images + {more} appended, chunks of {args.chunk_images}:")
    print(f"  extract all {args.images + more}: {whole_s:.1f} s")
    print(f"  append {more}: {append_s:.1f} s = {append_s / whole_s:.3f}x the whole (goal <= 0.15x)")


if __name__ == "__main__":
    main()
