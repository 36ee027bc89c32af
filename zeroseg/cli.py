"""The `zeroseg` command: one thin verb per stage. Parsing and calling only; the work lives in
pipeline/, stores/, trainer/, segment/ and experiments/.

Each verb imports its room when it is called: torch, open_clip and Ray take seconds to import,
and `zeroseg --help` or a light verb should not wait for them."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from zeroseg.errors import UserError
from zeroseg.trainer.recipes import DEFAULT_PRESET, DEFAULT_RECIPE, RECIPE_NAMES  # json only: cheap to import

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)
# User text (paths, notices, error messages) never goes into Rich markup unescaped: a path like
# data/[red]/x.jpg prints as it is. `err` prints escaped errors; `plain` prints with markup off.
err = Console(stderr=True)
plain = Console(stderr=True, markup=False)


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
    from zeroseg.experiments.scenes import generate_scenes

    manifest = generate_scenes(out, n=n, split=split, seed=seed, size=size)
    print(manifest)


# ---- extract and store (pipeline/runner.py, stores/inspect.py) ------------------------------

store_app = typer.Typer(no_args_is_help=True, help="Inspect, compact and export a feature store.")
app.add_typer(store_app, name="store")


def _grids(text: str) -> tuple[int, ...]:
    try:
        grids = tuple(int(g) for g in text.split(","))
    except ValueError:
        raise UserError(f"--grids {text}: give grid sizes like 1,2,3,4")
    if not grids or min(grids) < 1:
        raise UserError(f"--grids {text}: grid sizes must be positive")
    return grids


@app.command()
def extract(
    images: str = typer.Argument(..., help="a folder (recursive), a glob, an image or a manifest (one path per line, or .jsonl with 'image'); WebDataset shards; a table (see --input-format)"),
    store: str = typer.Argument(..., help="the feature store: a path or an fsspec URL (file://, memory://, s3://...)"),
    teacher: str = typer.Option("zeroseg-tiny", help="open_clip architecture"),
    pretrained: str = typer.Option("random", help="open_clip tag, a local checkpoint, or 'random'"),
    seed: int = typer.Option(0, help="seed of the random init (with --pretrained random)"),
    grids: str = typer.Option("1,2,3,4", help="grid sizes: g x g crops of the training view each"),
    view_size: int = typer.Option(224, help="training view side (resize shorter side + center crop)"),
    batch: int = typer.Option(None, help="crops per teacher forward, whole images [default: store's, or 256]"),
    chunk_images: int = typer.Option(None, help="images per store chunk [default: store's, or 64]"),
    pixels: bool = typer.Option(None, "--pixels/--no-pixels", help="also store the training views [default: store's, or no]"),
    workers: int = typer.Option(None, help="Ray actors [default: one per CPU]; 0 runs in this process without Ray"),
    address: str = typer.Option(None, help="join this Ray cluster instead of starting a local one"),
    device: str = typer.Option("cpu", help="where the teacher runs: cpu | cuda | auto (cuda where there is one)"),
    precision: str = typer.Option(None, help="the teacher's forward: fp32 | bf16 | fp16 (autocast) [default: store's, or fp32]"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print images, crops, FLOPs, bytes on disk and an ETA from a timed sample; write nothing"),
    input_format: str = typer.Option("auto", help="files | webdataset (tar shards: shards/{00000..00009}.tar, a glob or a manifest of shards) | table (.parquet/.csv) | auto (by IMAGES' name)"),
    path_column: str = typer.Option("path", help="a table's column holding the image paths"),
    append: bool = typer.Option(False, "--append", help="IMAGES lists images to add to the existing STORE (at its end), not its whole listing"),
) -> None:
    """Embed the grid crops of every image into STORE; re-run the same command to resume. On an
    existing store, images IMAGES lists that it does not hold yet are added at its end."""
    from zeroseg.pipeline.runner import ExtractConfig
    from zeroseg.ui import extract_with_progress

    config = ExtractConfig(
        teacher=teacher, pretrained=pretrained, seed=seed, grids=_grids(grids), view_size=view_size,
        batch=batch, chunk_images=chunk_images, pixels=pixels, workers=workers, address=address,
        device=device, precision=precision, input_format=input_format, path_column=path_column, append=append,
    )
    if dry_run:
        from zeroseg.pipeline.estimate import estimate, format_estimate

        print(format_estimate(estimate(images, store, config), store))
        return
    summary = extract_with_progress(images, store, config, plain)
    if summary.pending:
        raise typer.Exit(1)


@store_app.command("info")
def store_info(
    store: str = typer.Argument(..., help="the feature store"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Counts by status, shape, chunking, bytes on disk, teacher and grids."""
    from zeroseg.stores.inspect import format_info, store_info as info

    report = info(store)
    print(json.dumps(report, indent=2) if as_json else format_info(report))


@store_app.command("verify")
def store_verify(
    store: str = typer.Argument(..., help="the feature store"),
    repair: bool = typer.Option(False, "--repair", help="mark chunks with damaged data pending, for `extract` to redo"),
    teacher_key: str = typer.Option(None, "--teacher-key", help="check this teacher's features of the store [default: its first]"),
) -> None:
    """Read every chunk (damaged ones are named) and check features against status; exit 1 on problems."""
    from zeroseg.stores.inspect import format_norms, repair_store, verify_store

    report, problems, damage = verify_store(store, teacher_key)
    print(format_norms(report))
    for problem in problems:
        print(f"problem: {problem}")
    if damage and repair:
        redo, cannot = repair_store(store, damage, teacher_key)
        if redo:
            print(f"repair: marked {len(redo)} chunks pending ({', '.join(map(str, redo))}): "
                  "re-run the same `zeroseg extract IMAGES STORE` to redo exactly them")
        for line in cannot:
            print(f"cannot repair: {line}")
    elif damage:
        print(f"{len(damage)} damaged chunks: `zeroseg store verify --repair {store}` marks them pending for extract to redo")
    for kind, c in report.get("compact", {}).items():
        print(f"{kind} targets: cosine to fp16 min {c['min_cosine']:.5f}  mean {c['mean_cosine']:.5f} over "
              f"{c['vectors']} vectors ({c['chunks_written']} of {c['chunks']} chunks written)")
    if problems:
        raise typer.Exit(1)
    print(f"{store}: ok ({report['ok']} of {report['images']} images ok, no problems)")


@store_app.command("compact")
def store_compact(
    store: str = typer.Argument(..., help="the feature store"),
    to: str = typer.Option(..., "--to", help="int8 (per-vector scale) | pq (product quantizer, codebook in the store)"),
    pq_subvectors: int = typer.Option(None, "--pq-subvectors", help="pq: sub-vectors per feature [default: dims / 4]"),
) -> None:
    """Write the features also as int8 or PQ codes, beside the fp16 ones; re-run to resume."""
    from zeroseg.stores.compact import compact_store

    done = compact_store(store, to, pq_subvectors, notify=plain.print)
    print(f"{store}: {to} targets written for {done['written']} chunks ({done['chunks']} in all); "
          f"train on them with --targets-dtype {to}")


@store_app.command("migrate")
def store_migrate(store: str = typer.Argument(..., help="the feature store")) -> None:
    """Make an older store (schema 1-4) version 5 and its compressed crop features raw, in place
    (re-run after a kill to finish)."""
    from zeroseg.stores.migrate import migrate_store

    print(migrate_store(store, notify=plain.print))


@store_app.command("export")
def store_export(
    store: str = typer.Argument(..., help="the feature store"),
    out: Path = typer.Argument(..., help="a new or empty folder (or an export of ours, replaced)"),
    fmt: str = typer.Option("npy-parquet", "--format", help="npy-parquet: clip-retrieval's img_emb/ + metadata/ layout"),
    grid: int = typer.Option(1, help="the grid whose crops are exported (1: one row per image)"),
    part_rows: int = typer.Option(1_000_000, "--part-rows", help="rows per img_emb_N.npy / metadata_N.parquet part"),
    dtype: str = typer.Option("float16", help="float16 (as stored) | float32"),
    teacher_key: str = typer.Option(None, "--teacher-key", help="export this teacher's features (`store info` lists them) [default: its first]"),
) -> None:
    """Export the ok images' embeddings for autofaiss / clip-retrieval (numpy + Parquet)."""
    from zeroseg.stores.export import export_store

    done = export_store(store, out, fmt, grid, part_rows, dtype, teacher_key)
    print(f"{out}: {done['rows']} rows of {done['images']} ok images in {done['parts']} parts")


# ---- trainer ------------------------------------------------------------------------------------


@app.command()
def train(
    store: str = typer.Argument(..., help="feature store (path or fsspec URL)"),
    out: Path = typer.Option(..., "--out", help="run dir: config, metrics, curves, checkpoint"),
    # Every option below left out keeps the recipe's or TrainConfig's value (zeroseg/trainer/config.py).
    preset: str = typer.Option(None, help=f"student size: tiny | small | base [default: {DEFAULT_PRESET}]"),
    steps: int = typer.Option(None, help="optimizer steps"),
    epochs: float = typer.Option(None, help="passes over the store's ok images (instead of --steps)"),
    batch: int = typer.Option(None, help="images per step"),
    lr: float = typer.Option(None, help="peak learning rate (warm-up then cosine)"),
    grids: str = typer.Option(None, help="crop grids to distil, e.g. 1,2,3 (default: all the store's)"),
    mask_ratio: float = typer.Option(None, "--mask-ratio", help="MAE masking ratio in training"),
    recipe: str = typer.Option(None, help=f"{' | '.join(RECIPE_NAMES)} (trainer/recipes/*.json) [default: {DEFAULT_RECIPE}]"),
    loss: str = typer.Option(None, help="replace the recipe's loss terms [=weight]: distill, match, mae, cover, region, assign"),
    multiscale: bool = typer.Option(None, "--multiscale/--single-scale", help="distil z to every crop, or the 1x1 only [default: the recipe's]"),
    target_norm: str = typer.Option(None, "--target-norm", help="l2 | none | whiten (l2, every L1 measured after the targets' ZCA whitening): teacher features as targets [default: the recipe's]"),
    targets: str = typer.Option(None, help="cached (the default: read the store) | online (run the teacher)"),
    targets_dtype: str = typer.Option(None, "--targets-dtype", help="fp16 (the default: as stored) | int8 | pq (the store's compact targets: `store compact`)"),
    teacher_key: str = typer.Option(None, "--teacher-key", help="distil this teacher of the store (`store info` lists them) [default: its first]"),
    precision: str = typer.Option(None, help="fp32 (the default) | bf16 (autocast)"),
    seed: int = typer.Option(None, help="the run is a pure function of the seed and the store"),
    threads: int = typer.Option(None, help="torch compute threads (default: one per core; 1 on a busy machine)"),
    checkpoint_every: int = typer.Option(None, "--checkpoint-every", help="steps between checkpoints (default 200)"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out with its own config"),
    stop_after: int = typer.Option(None, "--stop-after", help="leave (with a checkpoint) after N steps of this call"),
    workers: int = typer.Option(None, help="N data-parallel replicas on Ray, --batch split over them (default: this process alone)"),
    address: str = typer.Option(None, help="run the --workers on this Ray cluster instead of a local one"),
    device: str = typer.Option(None, help="cpu (the default) | cuda (with --workers: one GPU each)"),
) -> None:
    """Train the ZeroSeg student from a store's cached crop features (no teacher is run)."""
    from zeroseg.trainer.launch import run_train

    result = run_train(
        store, out, preset_name=preset, recipe_name=recipe, epochs=epochs, grids=_grids(grids) if grids else None,
        loss=loss, multiscale=multiscale, target_norm=target_norm, resume=resume, stop_after=stop_after,
        steps=steps, batch=batch, lr=lr, mask_ratio=mask_ratio, targets=targets, targets_dtype=targets_dtype, teacher_key=teacher_key, precision=precision, seed=seed,
        threads=threads, checkpoint_every=checkpoint_every, workers=workers, address=address, device=device,
    )
    print(f"step {result['step']}: {result.get('checkpoint', 'no new checkpoint')}  loss {result['metrics'].get('loss', '-')}")


# ---- ablations (experiments/ablate.py) ----------------------------------------------------------


@app.command()
def ablate(
    store: str = typer.Argument(..., help="feature store (path or fsspec URL)"),
    out: Path = typer.Option(..., "--out", help="ablation dir: trials/, results.csv, results.md, miou.png"),
    eval_dataset: str = typer.Option(..., "--eval", help="labelled dataset: a scenes folder or a VOC folder"),
    vocab: str = typer.Option(..., help="the store's text vocabulary to classify segments with"),
    grid: str = typer.Option(None, help="a YAML/JSON spec (file or inline): {grid: {field: [values]}} or {trials: [...]}"),
    preset: str = typer.Option(None, help="one of the paper's tables: scales | losses | mask-ratio | tokens"),
    teachers: str = typer.Option(None, help="comma-separated teacher keys of the store (`store info`): every trial once per teacher"),
    steps: int = typer.Option(None, help="optimizer steps per trial [default: 300]"),
    seeds: str = typer.Option(None, help="comma-separated seeds; every trial runs once per seed [default: 0]"),
    student: str = typer.Option(None, help=f"student preset: tiny | small | base [default: {DEFAULT_PRESET}]"),
    recipe: str = typer.Option(None, help=f"the base every trial changes: {' | '.join(RECIPE_NAMES)} [default: {DEFAULT_RECIPE}]"),
    batch: int = typer.Option(None, help="images per step"),
    calibrate_on: str = typer.Option(None, help="pick the background threshold on this (train) dataset"),
    bg_threshold: float = typer.Option(None, help="fixed background threshold (else calibrated or the paper's)"),
    trials_parallel: int = typer.Option(None, help="trials at once as Ray Tune trials [default: one per CPU]; 0 = in this process"),
    address: str = typer.Option(None, help="join this Ray cluster"),
    online_ratio: float = typer.Option(None, help="cached/online speed ratio for the cost estimate (benchmarks/train.py)"),
) -> None:
    """Many short trainings over one store, then the paper-style tables; re-run to resume."""
    from zeroseg.experiments.ablate import run_ablation

    if grid is not None and preset is not None or grid is None and preset is None and teachers is None:
        raise UserError("give one of --grid SPEC or --preset NAME (or --teachers alone)")
    try:
        seed_list = [int(s) for s in seeds.split(",")] if seeds is not None else None
    except ValueError:
        raise UserError(f"--seeds takes comma-separated integers, not {seeds!r}")
    # Options left out keep run_ablation's defaults (and TrainConfig's, through the recipe).
    given = dict(steps=steps, seeds=seed_list, preset=student, recipe_name=recipe, batch=batch, online_ratio=online_ratio,
                 teachers=teachers.split(",") if teachers else None)
    report = run_ablation(
        store, grid or preset, out, eval_dataset, vocab, calibrate_on=calibrate_on, threshold=bg_threshold,
        parallel=trials_parallel, address=address, **{k: v for k, v in given.items() if v is not None},
    )
    print(report.markdown)


# ---- neighbour index: `index build`, `query` ---------------------------------------------

index_app = typer.Typer(no_args_is_help=True, help="Build a FAISS neighbour index over crops or segment tokens.")
app.add_typer(index_app, name="index")


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return ""


@index_app.command("build")
def index_build(
    store: str = typer.Argument(..., help="feature store (path or fsspec URL)"),
    out: Path = typer.Option(..., "--out", help="index folder to write"),
    source: str = typer.Option("crops", help="crops (the store's features) | segments (student tokens)"),
    checkpoint: str = typer.Option(None, help="student run dir or checkpoint (source segments)"),
    grids: str = typer.Option(None, help="crops: index only these grid levels, e.g. 2,3,4 (default all)"),
    kind: str = typer.Option("auto", help="auto | flat | hnsw | ivf-pq | ivf-pq-sq8 | ivf-rabitq-store | ivf-pq-store (auto: flat below 100k "
                             "vectors, then by available memory)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the memory and disk each kind would take; build nothing"),
    teacher_key: str = typer.Option(None, "--teacher-key", help="this teacher's crop features (`store info` lists them) [default: the store's first]"),
    workers: int = typer.Option(1, help="segments: Ray actors computing the student's tokens, one torch thread "
                                "each (1: this process, no Ray)"),
    address: str = typer.Option(None, help="segments: join the Ray cluster at ADDRESS for --workers N"),
) -> None:
    """Index a store's crop features or a student's segment tokens for `zeroseg query`. Segment
    tokens are staged in OUT chunk by chunk: re-run the same command to resume a killed build."""
    from zeroseg.segment.neighbours import BuildConfig, build_index, index_footprints

    config = BuildConfig(source=source, kind=kind, checkpoint=checkpoint, grids=_grids(grids) if grids else None,
                         teacher_key=teacher_key, workers=workers, address=address)
    if dry_run:
        n, auto, rows, store_rows = index_footprints(store, config)
        print(f"{n} {source} vectors of {store}; computed from FAISS's layouts, nothing built or written")
        print(f"{'kind':<24} {'factory':<38} {'RAM B/vec':>9} {'disk B/vec':>10} {'RAM':>11} {'disk':>11}")
        for r in rows:
            name = r["kind"] + (" (auto)" if r["kind"] == auto else "")
            print(f"{name:<24} {r['factory']:<38} {r['ram_per_vector']:>9.0f} {r['disk_per_vector']:>10.0f} "
                  f"{_bytes(r['ram_bytes']):>11} {_bytes(r['disk_bytes']):>11}")
        if store_rows == "mapped":
            print("the *-store kinds read each candidate as a row of the store's raw feature chunks, mapped: as fast "
                  "as an in-RAM copy while the OS caches the store's features")
        elif store_rows == "chunks":
            print("the *-store kinds: this store's features are compressed (or remote), so each candidate decodes a "
                  "whole chunk: ~1000x slower than a store written raw")
        return
    meta = build_index(store, out, config)
    print(f"{out}: {meta.count} {meta.source} vectors, {meta.kind} ({meta.factory})")
    if meta.tuned:
        t = meta.tuned
        print(f"probes {meta.search_params['nprobe']} lists a query: recall@10 {t['recall']:.3f} on {t['queries']} of its "
              f"own vectors against exact search" + ("" if t["recall"] >= t["target"] else f", below the {t['target']} aimed at"))


@app.command()
def query(
    index: Path = typer.Argument(..., help="index folder from `zeroseg index build`"),
    image: int = typer.Option(None, help="query image index (with --crop or --token)"),
    crop: int = typer.Option(None, help="query crop index within --image"),
    token: int = typer.Option(None, help="query segment token within --image"),
    text: str = typer.Option(None, help="query text, embedded by the store's teacher"),
    image_file: str = typer.Option(None, help="a photograph not in the store: its --crop (default 0) by the store's teacher, or its --token (default: largest segment) by the student"),
    store: str = typer.Option(None, help="the feature store (default: the one the index records)"),
    checkpoint: str = typer.Option(None, help="the student (default: the one the index records)"),
    k: int = typer.Option(10, "--k", help="neighbours to return; a crop or token query is shown apart, not counted"),
    out: Path = typer.Option(None, "--out", help="contact sheet PNG to write"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Nearest crops or segments of a crop, a token, a text or a photograph; optionally a contact sheet PNG."""
    from zeroseg.segment.neighbours import neighbours_table, query_index

    result = query_index(index, image=image, crop=crop, token=token, text=text, image_file=image_file, store_url=store,
                         checkpoint=checkpoint, k=k, sheet=out)
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        Console(markup=False).print(neighbours_table(result))
        if result.sheet:
            print(f"contact sheet: {result.sheet}")


# ---- text, segment, eval, teacher, demo (segment/ and experiments/) -----------------------------


@app.command()
def text(
    store: str = typer.Argument(..., help="feature store (path or URL) whose teacher embeds the names"),
    vocab: str = typer.Option(..., "--vocab", help="name to cache the vocabulary under (text/<vocab>)"),
    classes: str = typer.Option(..., "--classes", help="a file (one name a line) or a comma-separated list"),
    teacher_key: str = typer.Option(None, "--teacher-key", help="embed with this teacher of the store, for its own vocabularies [default: its first]"),
) -> None:
    """Cache class-name text embeddings (prompt templates averaged) in the store."""
    from zeroseg.segment.text import TEMPLATES, cache_vocabulary, parse_classes

    names = parse_classes(classes)
    emb = cache_vocabulary(store, vocab, names, TEMPLATES, teacher=teacher_key)
    print(f"{store}: text/{vocab} {len(names)} classes x {emb.shape[1]} dims")


@app.command()
def segment(
    checkpoint: Path = typer.Argument(..., help="student run dir or checkpoint file"),
    images: list[Path] = typer.Argument(..., help="images to segment"),
    store: str = typer.Option(..., "--store", help="feature store holding the vocabulary"),
    vocab: str = typer.Option(..., "--vocab", help="cached vocabulary name"),
    bg_threshold: float = typer.Option(None, help="cosine below which a segment is background (default: the run's calibrated one, else the paper's 0.95)"),
    out: Path = typer.Option(Path("segment-out"), "--out", help="folder for <stem>_mask.png and <stem>_overlay.png"),
) -> None:
    """Zero-shot masks: each segment token takes its nearest class name, or background."""
    from zeroseg.segment.evaluate import segment_images

    threshold, written = segment_images(checkpoint, images, store, vocab, bg_threshold, out)
    err.print(str(threshold), markup=False, highlight=False, soft_wrap=True)
    for mask, overlay in written:
        print(f"{mask}  {overlay}")


@app.command("eval")
def eval_(
    checkpoint: Path = typer.Argument(None, help="student run dir or checkpoint file (left out for grid, dense and ceiling)"),
    dataset: Path = typer.Argument(None, help="a scenes folder (manifest.jsonl) or a VOC-style folder"),
    store: str = typer.Option(..., "--store", help="feature store holding the vocabulary"),
    vocab: str = typer.Option(..., "--vocab", help="cached vocabulary; its names must be dataset classes"),
    bg_threshold: float = typer.Option(None, help="background threshold (default: the run's calibrated one, else the paper's 0.95)"),
    calibrate_on: Path = typer.Option(None, help="labelled train split to choose the threshold on (stored in the run)"),
    method: str = typer.Option("student", help="student | grid (the teacher alone on a 4x4 grid) | dense (the teacher alone, read densely: MaskCLIP) | ceiling (the teacher on the true segments: a bound)"),
    dense_variant: str = typer.Option("maskclip", help="--method dense on a ViT teacher: maskclip | clearclip (no residual, no MLP in the last block)"),
    split: str = typer.Option("val", help="ImageSets/Segmentation/<split>.txt of a VOC folder"),
    limit: int = typer.Option(None, help="evaluate the first N images only"),
    teacher_key: str = typer.Option(None, "--teacher-key", help="grid | dense | ceiling: this teacher of the store [default: its first]; a student uses its own"),
    out: Path = typer.Option(Path("eval-out"), "--out", help="folder for eval_<method>.json and its confusion PNG"),
) -> None:
    """Per-class IoU and mIoU (background included, 255 ignored) on a labelled dataset."""
    from zeroseg.segment.evaluate import Threshold, run_eval

    if dataset is None and method != "student":  # `zeroseg eval DATASET --method grid`
        checkpoint, dataset = None, checkpoint
    if dataset is None:
        raise UserError("give the dataset (and, for --method student, the checkpoint before it)")
    if bg_threshold is not None and calibrate_on is not None:
        raise UserError("give --bg-threshold or --calibrate-on, not both")
    if dense_variant != "maskclip" and method != "dense":
        raise UserError("--dense-variant is for --method dense")
    report = run_eval(checkpoint, dataset, store, vocab, out, bg_threshold, calibrate_on, method, split, limit,
                      dense_variant=dense_variant, teacher_key=teacher_key)
    err.print(str(Threshold(report["bg_threshold"], report["bg_threshold_source"])), markup=False, highlight=False, soft_wrap=True)
    print(json.dumps(report, indent=2))


@app.command("diagnose")
def diagnose(
    run: Path = typer.Argument(..., help="student run dir or checkpoint file"),
    heldout: Path = typer.Argument(..., help="held-out scenes folder (the objects scored)"),
    store: str = typer.Option(..., "--store", help="the feature store the student was trained on"),
    vocab: str = typer.Option(..., "--vocab", help="cached vocabulary naming the scenes' classes"),
    train: Path = typer.Option(..., "--train", help="train scenes folder (the objects the linear probes are fit on)"),
    limit: int = typer.Option(200, help="scenes of each split to read"),
    out: Path = typer.Option(None, "--out", help="also write diagnose.json here"),
) -> None:
    """Where shape is lost: zero-shot and linear-probe accuracy of colour and shape per object, from
    the teacher's crop around it, the cache's nearest grid crop, the student's patches and segment."""
    from zeroseg.experiments.diagnose import diagnose as run_diagnose
    from zeroseg.experiments.diagnose import diagnose_table

    report = run_diagnose(run, store, vocab, train, heldout, out, limit)
    err.print(diagnose_table(report))
    print(json.dumps(report, indent=2))


teacher_app = typer.Typer(no_args_is_help=True, help="The toy CLIP teacher of the offline default.")
app.add_typer(teacher_app, name="teacher")


@teacher_app.command("train")
def teacher_train(
    out: Path = typer.Option(None, "--out", help="also copy the checkpoint here (.safetensors)"),
    preset: str = typer.Option("default", help="default | tiny"),
) -> None:
    """Train the toy teacher (once: it is cached by config hash) and print its zero-shot accuracy."""
    from zeroseg.experiments.toy_teacher import export_toy_teacher

    path, report = export_toy_teacher(preset, out)
    print(f"{path}: zero-shot accuracy {report['zero_shot_accuracy']:.3f} on {report['heldout_images']} "
          f"held-out single objects, {report['scene_object_accuracy']:.3f} on objects cut from held-out scenes, "
          f"trained in {report['train_seconds']:.0f} s")


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", help="folder for scenes, store, run, results"),
    preset: str = typer.Option("default", help="default (<= 10 min) | quality (`make quality`: the student with a real budget, 3 seeds, <= 60 min) | tiny (seconds, for tests)"),
) -> None:
    """The whole ZeroSeg loop offline: scenes, toy teacher, cache, text, student, mIoU, overlays."""
    from zeroseg.experiments.demo import run_demo

    run_demo(out, preset)


def main() -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    try:
        app()
    except UserError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)  # one line, never wrapped
        sys.exit(2)
