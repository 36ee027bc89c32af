"""The `zeroseg` command: one thin verb per stage. Parsing and calling only; the work lives in
pipeline/, stores/, trainer/, segment/ and demo/."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer
from rich.console import Console

from zeroseg.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)
err = Console(stderr=True)


@app.callback()
def zeroseg() -> None:
    """ZeroSeg: a CLIP crop-feature cache (Ray + Zarr) and a fast student trainer that reads it."""


@app.command()
def scenes(
    out: Path = typer.Argument(..., help="folder for images/, masks/ and manifest.jsonl"),
    n: int = typer.Option(300, "--n", help="number of scenes"),
    split: str = typer.Option("train", help="train | heldout (never share an image)"),
    seed: int = typer.Option(0, help="scenes are a pure function of (seed, split, index)"),
    size: int = typer.Option(224, help="image side in pixels"),
) -> None:
    """Generate synthetic scenes with exact masks and captions (the offline data)."""
    from zeroseg.demo.scenes import generate_scenes

    manifest = generate_scenes(out, n=n, split=split, seed=seed, size=size)
    print(manifest)


# ---- neighbour index: `index build`, `query` ---------------------------------------------

index_app = typer.Typer(no_args_is_help=True, help="Build a FAISS neighbour index over crops or segment tokens.")
app.add_typer(index_app, name="index")


@index_app.command("build")
def index_build(
    store: str = typer.Argument(..., help="feature store (path or fsspec URL)"),
    out: Path = typer.Option(..., "--out", help="index folder to write"),
    source: str = typer.Option("crops", help="crops (the store's features) | segments (student tokens)"),
    checkpoint: str = typer.Option(None, help="student run dir or checkpoint (source segments)"),
    grids: str = typer.Option(None, help="crops: index only these grid levels, e.g. 2,3,4 (default all)"),
    kind: str = typer.Option("auto", help="auto | flat | hnsw | ivf-pq (auto: flat below 100k vectors)"),
) -> None:
    """Index a store's crop features or a student's segment tokens for `zeroseg query`."""
    from zeroseg.segment.neighbours import BuildConfig, build_index, parse_grids

    config = BuildConfig(source=source, kind=kind, checkpoint=checkpoint, grids=parse_grids(grids))
    meta = build_index(store, out, config)
    print(f"{out}: {meta.count} {meta.source} vectors, {meta.kind} ({meta.factory})")


@app.command()
def query(
    index: Path = typer.Argument(..., help="index folder from `zeroseg index build`"),
    image: int = typer.Option(None, help="query image index (with --crop or --token)"),
    crop: int = typer.Option(None, help="query crop index within --image"),
    token: int = typer.Option(None, help="query segment token within --image"),
    text: str = typer.Option(None, help="query text, embedded by the store's teacher"),
    store: str = typer.Option(None, help="the feature store (default: the one the index records)"),
    checkpoint: str = typer.Option(None, help="the student (default: the one the index records)"),
    k: int = typer.Option(10, "--k", help="neighbours to return"),
    out: Path = typer.Option(None, "--out", help="contact sheet PNG to write"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Nearest crops or segments of a crop, a token or a text; optionally a contact sheet PNG."""
    import json

    from zeroseg.segment.neighbours import neighbours_table, query_index

    result = query_index(index, image=image, crop=crop, token=token, text=text, store_url=store,
                         checkpoint=checkpoint, k=k, sheet=out)
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        Console().print(neighbours_table(result))
        if result.sheet:
            print(f"contact sheet: {result.sheet}")

def main() -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    try:
        app()
    except UserError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        sys.exit(2)
