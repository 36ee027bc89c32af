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


def main() -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    try:
        app()
    except UserError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        sys.exit(2)
