"""The neighbour index's vectors and queries (the format and the out-of-core build live in
zeroseg.stores.index, the pictures in zeroseg.segment.render).

"Which crops does the text 'red circle' match?", "which segments elsewhere look like this one?":
`build_index` feeds a store's crop features (`CropVectors`) or a student's segment tokens
(`SegmentVectors`, staged chunk by chunk in the index folder and computed on Ray workers by
zeroseg.segment.tokens) to an index folder; `query_index` finds the neighbours of a crop, a token or a
text and, when asked, has their contact sheet drawn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from zeroseg.decode import Decoded, decode_image
from zeroseg.errors import UserError
from zeroseg.geometry import grid_levels
from zeroseg.outputs import check_output_dir, claim_output_dir
from zeroseg.segment.render import contact_sheet
from zeroseg.segment.text import embed_classes
from zeroseg.stores.features import FeatureStore, StoreError
from zeroseg.stores.schema import Status, TeacherInfo, teacher_key
from zeroseg.stores.index import (
    IndexMeta,
    NeighbourIndex,
    KINDS,
    STORE_RERANKED,
    TUNE_QUERIES,
    TUNE_RECALL,
    NeighbourIndexError,
    check_complete,
    decode_ids,
    encode_ids,
    index_footprint,
    index_spec,
    store_fingerprint,
    store_rows,
)
from zeroseg.stores.views import row_views
from zeroseg.segment.tokens import SegmentVectors, StagedTokens, stage_tokens, staging_record


@dataclass
class BuildConfig:
    source: str = "crops"  # "crops" | "segments"
    kind: str = "auto"  # one of zeroseg.stores.index.KINDS (index_spec)
    checkpoint: str | None = None  # the student, for source "segments"
    grids: tuple[int, ...] | None = None  # crops: index only these grid levels (None = all)
    batch_vectors: int = 65_536  # vectors per add: bounds memory (64k x 512 float32 = 128 MB)
    seed: int = 0  # picks the training sample of an IVF index
    teacher_key: str | None = None  # whose crop features (a teacher of the store; None its first)
    workers: int = 1  # segments: Ray actors computing the tokens (1: this process, no Ray)
    address: str | None = None  # segments: the Ray cluster of `workers` (None: a local Ray)


# ---- vector sources: a store chunk in, (ids, vectors) out ---------------------------------


class CropVectors:
    """The store's crop features of status-ok images, optionally only some grid levels."""

    source = "crops"

    def __init__(self, store: FeatureStore, grids: tuple[int, ...] | None):
        have = store.config.grids
        grids = tuple(grids or have)
        missing = [g for g in grids if g not in have]
        if missing:
            raise UserError(f"store has grids {','.join(map(str, have))}, not {','.join(map(str, missing))}")
        self.store = store
        self.rows = store.distinct_ok()  # read once; a copy of an earlier row would be found twice
        self.grids = grids
        self.crops = np.concatenate([np.arange(c.start, c.stop) for g, c in grid_levels(have) if g in grids])
        self.stride = store.n_crops
        self.checkpoint = None

    def estimate_count(self) -> int:
        return int(self.rows.sum()) * len(self.crops)

    def chunk(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Chunk i -> ids (n,) int64, vectors (n, D) float16."""
        sl = self.store.chunk_slice(i)
        ok = np.flatnonzero(self.rows[sl])
        feats = self.store.features[sl][ok][:, self.crops]  # (n_ok, c, D)
        image, crop = np.meshgrid(sl.start + ok, self.crops, indexing="ij")
        return encode_ids(image.ravel(), crop.ravel(), self.stride), feats.reshape(-1, feats.shape[-1])


def _vectors_for(store: FeatureStore, config: BuildConfig) -> CropVectors | SegmentVectors:
    if config.source == "crops":
        if config.checkpoint:
            raise UserError("--checkpoint is for --source segments; crops come from the store")
        vectors = CropVectors(store, config.grids)
    elif config.source == "segments":
        if not config.checkpoint:
            raise UserError("--source segments needs --checkpoint (the trained student)")
        vectors = SegmentVectors(store, config.checkpoint)
    else:
        raise UserError(f"unknown source {config.source!r} (crops or segments)")
    if vectors.estimate_count() == 0:
        raise UserError(f"{store.url} has no images with status ok: nothing to index")
    return vectors


def _kinds_for(source: str) -> list[str]:
    """The concrete kinds a source can be built as (a segments index cannot re-rank from the store)."""
    return [k for k in KINDS if k != "auto" and (source == "crops" or k not in STORE_RERANKED)]


def _store_rows(store: FeatureStore, vectors) -> str | None:
    """How the vectors can be read back from the store (crops), or None (segment tokens)."""
    return store_rows(store) if vectors.source == "crops" else None


def index_footprints(store_url: str, config: BuildConfig) -> tuple[int, str, list[dict], str | None]:
    """`index build --dry-run`: (vectors, the kind `auto` picks, each kind's index_footprint, how
    the store re-rank would read the store: "mapped", "chunks" or None) for this store; builds
    nothing and writes nothing."""
    store = FeatureStore.open(store_url, teacher=config.teacher_key)
    vectors = _vectors_for(store, config)
    n = vectors.estimate_count()
    rows = _store_rows(store, vectors)
    auto = index_spec("auto", n, store.dim, rows).kind
    return n, auto, [index_footprint(k, n, store.dim) for k in _kinds_for(vectors.source)], rows


def build_index(store_url: str, out: str | Path, config: BuildConfig) -> IndexMeta:
    """Index the store's crops (or the student's segment tokens) into folder `out`. Segment
    tokens are first staged in `out` chunk by chunk (zeroseg.segment.tokens: resumable, and
    computed on `config.workers` Ray actors when more than one), then indexed from there."""
    if config.kind not in KINDS:
        raise UserError(f"unknown index kind {config.kind!r} (one of {', '.join(KINDS)})")
    _check_workers(config)
    store = FeatureStore.open(store_url, teacher=config.teacher_key)
    check_complete(store)
    vectors = _vectors_for(store, config)
    if config.kind not in ["auto", *_kinds_for(vectors.source)]:
        raise UserError(f"kind {config.kind} re-ranks from the store's crop features: not for --source {vectors.source}")
    n = vectors.estimate_count()
    spec = index_spec(config.kind, n, store.dim, _store_rows(store, vectors))
    check_output_dir(out, "index")  # refused before any work; crops: created only once there is an index to save
    meta = IndexMeta(
        source=vectors.source, kind=spec.kind, factory=spec.factory, build_params=spec.build_params,
        search_params=spec.search_params, dim=store.dim, stride=vectors.stride, count=0,
        store=store_fingerprint(store), checkpoint=vectors.checkpoint,
        grids=list(vectors.grids) if vectors.grids else None,
    )
    index = NeighbourIndex.new(spec, meta)
    indexing = f"indexing {vectors.source} ({spec.kind})"
    first = f"training {spec.factory} on {spec.train_size} vectors, then {indexing}" if index.needs_training else indexing
    columns = TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()
    with Progress(*columns, console=Console(stderr=True)) as progress:
        chunk = vectors.chunk
        if isinstance(vectors, SegmentVectors):
            claim_output_dir(out, "index")  # the staged tokens live in it
            notify = lambda line: progress.console.print(line, markup=False, highlight=False)  # noqa: E731
            staging = StagedTokens.open(out, staging_record(vectors), notify)
            staged = len(staging.staged())
            where = f"on {config.workers} Ray workers" if config.workers > 1 else "in this process"
            if staged:
                notify(f"{staged} of {store.n_chunks} chunks' tokens already staged in {staging.folder}")
            tokens = progress.add_task(f"segment tokens ({where})", total=store.n_chunks, completed=staged)
            stage_tokens(vectors, staging, workers=config.workers, address=config.address,
                         on_chunk=lambda: progress.update(tokens, advance=1))
            chunk = staging.read
        task = progress.add_task(first, total=store.n_chunks)
        index.fill(chunk, store.n_chunks, batch_vectors=config.batch_vectors, seed=config.seed,
                   on_chunk=lambda: progress.update(task, advance=1, description=indexing))
        if index.probes_lists:
            if index.reranks_from_store:
                index.attach_store(store)
            tuning = progress.add_task(f"nprobe for recall@10 {TUNE_RECALL}: exact search of {TUNE_QUERIES} vectors",
                                       total=store.n_chunks)
            index.tune_nprobe(chunk, store.n_chunks, seed=config.seed, on_chunk=lambda: progress.update(tuning, advance=1))
    claim_output_dir(out, "index")  # a folder of ours is rebuilt; anyone else's was refused above
    index.save(out)
    return index.meta


def _check_workers(config: BuildConfig) -> None:
    if config.workers < 1:
        raise UserError(f"--workers must be at least 1, not {config.workers}")
    if config.workers > 1 and config.source != "segments":
        raise UserError("--workers computes a student's segment tokens: it is for --source segments")
    if config.address is not None and config.workers == 1:
        raise UserError("--address is where --workers N (N >= 2) run: give --workers too")


# ---- query -------------------------------------------------------------------------------


@dataclass
class Neighbour:
    rank: int  # 1.. = neighbours; 0 = the query's own crop or token (QueryResult.itself)
    image: int  # row of the store; -1 for a photograph queried from a file
    sub: int  # crop index or token index
    score: float  # cosine similarity to the query
    path: str
    box: list[float] | None = None  # crops: fractional x0, y0, x1, y1 in the training view


@dataclass
class QueryResult:
    source: str  # what the index holds: crops | segments
    query: dict  # {"text": ...} or {"image", "crop"|"token", "path"}
    k: int  # neighbours asked for
    # A crop or token query's own row (rank 0): shown first, never one of the k neighbours.
    # A text has no vector in the index: None.
    itself: Neighbour | None = None
    neighbours: list[Neighbour] = field(default_factory=list)  # at most k, ranks 1..k
    sheet: str | None = None  # the contact sheet PNG, when one was asked for

    def rows(self) -> list[Neighbour]:
        """What is shown: the query's own row (if any), then the neighbours."""
        return ([self.itself] if self.itself else []) + self.neighbours

    def note(self) -> str:
        """Whether the query is counted among the neighbours, in words (it never is)."""
        what = "crop" if self.source == "crops" else "token"
        found = f"{len(self.neighbours)} neighbours" + (f" (only these of --k {self.k} found)" if len(self.neighbours) < self.k else "")
        if self.itself is None:
            return f"{found}; a text query has no vector of its own in the index"
        return f"{found}; the query {what} itself is shown first (rank 0) and not counted"

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "query": self.query,
            "k": self.k,
            "query_counted": False,
            "note": self.note(),
            "itself": vars(self.itself) if self.itself else None,
            "neighbours": [vars(n) for n in self.neighbours],
            "sheet": self.sheet,
        }


def open_for_query(index_dir: str | Path, store_url: str | None) -> tuple[NeighbourIndex, FeatureStore]:
    """The index and the store it was built from (the recorded one unless `store_url` is given),
    seen through the teacher it was built with, refusing a store other than the index's."""
    index = NeighbourIndex.open(index_dir)
    url = store_url or index.meta.store["url"]
    try:
        store = FeatureStore.open(url)
        key = teacher_key(TeacherInfo.from_dict(index.meta.store["teacher"]))
        if key in store.teacher_keys():  # else check_store below names both teachers
            store = FeatureStore.open(url, teacher=key)
    except StoreError as e:
        hint = "" if store_url else " (the store recorded in the index; pass --store)"
        raise NeighbourIndexError(f"{e}{hint}")
    # A changed store is a warning, not a refusal: the index still answers from its own vectors,
    # and only the rows now pending (not vouched for by the store) may be out of date.
    changed = index.check_store(store)
    if changed:
        Console(stderr=True).print(changed, markup=False, highlight=False, soft_wrap=True)
    if index.reranks_from_store:
        index.attach_store(store)
        if index.rows.unmapped_reason:
            Console(stderr=True).print(index.rows.unmapped_reason, markup=False, highlight=False, soft_wrap=True)
    return index, store


def text_vector(store: FeatureStore, text: str) -> np.ndarray:
    """The store's teacher's text embedding of `text`, prompt templates averaged: (D,) float32."""
    from zeroseg.pipeline.teacher import load_store_teacher  # open_clip: seconds to import; only text queries need it

    teacher = load_store_teacher(store)  # encode_text refuses a teacher without text tower
    return embed_classes(teacher.encode_text, [text])[0]


def photo_crops(store: FeatureStore, photo: str) -> tuple[np.ndarray, np.ndarray]:
    """A photograph that is not in the store, made as `extract` makes a row: its training view
    (S, S, 3) uint8 and the store's teacher's embedding of each of its crops (C, D) float32."""
    from zeroseg.pipeline.mapper import embed_chunk  # open_clip: seconds to import; only photo queries need it
    from zeroseg.pipeline.teacher import load_store_teacher

    decoded = decode_photo(store, photo)
    arrays = embed_chunk(load_store_teacher(store), [decoded], 1, store.config.view_size, store.n_crops, store.boxes)
    return decoded.view, arrays.features[0].astype(np.float32)


def decode_photo(store: FeatureStore, photo: str) -> Decoded:
    """PHOTO decoded into its training view at the store's size, by the extractor's decoder; a
    UserError naming the file if it has none."""
    decoded = decode_image(photo, store.config.view_size, store.config.grids)
    if decoded.view is None:
        raise UserError(f"cannot read {photo}: {decoded.error}")
    return decoded


def _student_for(index: NeighbourIndex, store: FeatureStore, checkpoint: str | None) -> SegmentVectors:
    """The student a segments index was built with (the recorded one unless given), checked."""
    path = checkpoint or index.meta.checkpoint["path"]
    student = SegmentVectors(store, path)
    index.check_checkpoint(path, student.checkpoint["sha256"])
    if student.stride != index.meta.stride:
        raise NeighbourIndexError(f"student gives {student.stride} tokens per image, the index {index.meta.stride}")
    return student


def _check_image(store: FeatureStore, image: int) -> None:
    if not 0 <= image < store.n_images:
        raise UserError(f"image {image} out of range: the store has {store.n_images} images")
    status = Status(int(store.status()[image]))
    if status != Status.OK:
        raise UserError(f"image {image} has status {status.name.lower()}: it is not in the index")


def query_index(
    index_dir: str | Path,
    *,
    image: int | None = None,
    crop: int | None = None,
    token: int | None = None,
    text: str | None = None,
    image_file: str | None = None,
    store_url: str | None = None,
    checkpoint: str | None = None,
    k: int = 10,
    sheet: str | Path | None = None,
) -> QueryResult:
    """The k nearest neighbours of a crop (image, crop), a token (image, token), a text, or a
    photograph that is not in the store (image_file, with crop or token: by default its whole-view
    crop 0, or its largest segment), and with `sheet` their contact sheet PNG. The query's own
    vector is never one of the k: it is returned apart, as `itself` (rank 0, score 1)."""
    if image_file is not None:
        if text is not None or image is not None:
            raise UserError("--image-file queries alone: give it without --image or --text")
        if crop is not None and token is not None:
            raise UserError("--image-file takes --crop (a crop index) or --token (a segment index), not both")
    elif (text is None) == (image is None) or (image is not None and (crop is None) == (token is None)):
        raise UserError("query one of: --image I --crop C, --image I --token T, --text TEXT, --image-file PHOTO")
    if k < 1:
        raise UserError(f"--k must be at least 1, not {k}")
    index, store = open_for_query(index_dir, store_url)
    meta = index.meta
    if checkpoint and meta.source == "crops":
        raise UserError(f"index {index_dir} holds crops, not segment tokens: it takes no --checkpoint")
    student = _student_for(index, store, checkpoint) if meta.source == "segments" else None
    photo = None  # (view, Neighbour) of an image_file query: shown first, not in the store
    if text is not None:
        query, self_id = {"text": text}, None
        vector = text_vector(store, text)
    elif image_file is not None:
        query, self_id = {"image_file": str(image_file)}, None
        vector, photo = _photo_query(store, meta, student, str(image_file), crop, token, query)
    else:
        wanted = "crop" if crop is not None else "token"
        if wanted != {"crops": "crop", "segments": "token"}[meta.source]:
            raise UserError(f"index holds {meta.source}: query it with --{'crop' if meta.source == 'crops' else 'token'}")
        _check_image(store, image)
        sub = crop if crop is not None else token
        if not 0 <= sub < meta.stride:
            raise UserError(f"{wanted} {sub} out of range: images have {meta.stride} {wanted}s")
        query, self_id = {"image": image, wanted: sub}, int(encode_ids(image, sub, meta.stride))
        if student is None:
            vector = store.features[image, crop].astype(np.float32)
        else:
            tokens, assignment = student.segment(row_views(store, [image]))
            if not (assignment[0] == token).any():
                used = ", ".join(map(str, np.unique(assignment[0])))
                raise UserError(f"token {token} of image {image} owns no patch (an empty segment); its segments: {used}")
            vector = tokens[0, token]

    # One more than k for a crop or token query: its own vector comes back too (score ~1) and is
    # dropped, so that exactly k others remain.
    scores, ids = index.search(vector[None], k + (self_id is not None))
    found = [(float(sc), int(i)) for sc, i in zip(scores[0], ids[0]) if i >= 0 and i != self_id][:k]
    paths, boxes = store.paths(), store.boxes
    if self_id is not None:
        query["path"] = str(paths[image])
        found.insert(0, (1.0, self_id))
    images, subs = decode_ids(np.array([i for _, i in found], dtype=np.int64), meta.stride)
    rows = []
    for j, ((score, _), image_j, sub) in enumerate(zip(found, images.tolist(), subs.tolist())):
        box = [round(float(v), 4) for v in boxes[sub]] if meta.source == "crops" else None
        rank = j if self_id is not None else j + 1
        rows.append(Neighbour(rank, image_j, sub, round(score, 4), str(paths[image_j]), box))
    itself = rows.pop(0) if self_id is not None else (photo[1] if photo else None)
    result = QueryResult(source=meta.source, query=query, k=k, itself=itself, neighbours=rows)
    if sheet is not None:
        result.sheet = str(draw_contact_sheet(result, store, sheet, student, photo[0] if photo else None))
    return result


def _photo_query(store: FeatureStore, meta: IndexMeta, student: SegmentVectors | None, photo: str,
                 crop: int | None, token: int | None, query: dict) -> tuple[np.ndarray, tuple[np.ndarray, Neighbour]]:
    """The query vector of a photograph (a crop by the store's teacher, or a segment token by the
    student) and its (view, row) for the table and the sheet; fills in `query`'s crop or token."""
    if student is None:
        if token is not None:
            raise UserError("index holds crops: query a photograph with --crop (default 0, the whole view)")
        crop = 0 if crop is None else crop
        if not 0 <= crop < meta.stride:
            raise UserError(f"crop {crop} out of range: images have {meta.stride} crops")
        view, crops = photo_crops(store, photo)
        query["crop"] = crop
        box = [round(float(v), 4) for v in store.boxes[crop]]
        return crops[crop], (view, Neighbour(0, -1, crop, 1.0, photo, box))
    if crop is not None:
        raise UserError("index holds segment tokens: query a photograph with --token (default: its largest segment)")
    view = decode_photo(store, photo).view
    tokens, assignment = student.segment(view[None])  # (1, K, D), (1, h, w)
    sizes = np.bincount(assignment[0].ravel(), minlength=tokens.shape[1])
    token = int(sizes.argmax()) if token is None else token
    if not 0 <= token < len(sizes) or sizes[token] == 0:
        owned = ", ".join(map(str, np.flatnonzero(sizes)))
        raise UserError(f"token {token} owns no patch of {photo}; its segments: {owned}")
    query["token"] = token
    return tokens[0, token], (view, Neighbour(0, -1, token, 1.0, photo))


def draw_contact_sheet(result: QueryResult, store: FeatureStore, out: str | Path,
                       student: SegmentVectors | None = None, query_view: np.ndarray | None = None) -> Path:
    """The query (a text tile, its own crop or token, or the photograph's view) then each of the k
    neighbours, on the views the teacher saw: crop boxes outlined, or with `student` each row's
    segment; rank and score under each."""
    rows = result.rows()
    views = row_views(store, [n.image for n in rows if n.image >= 0])
    if query_view is not None:  # an image_file query: its view is not in the store
        views = np.concatenate([query_view[None], views])
    masks = None
    if student is not None:  # each row's segment as a (h, w) bool mask on the student's patch grid
        _, assignment = student.segment(views)  # (n, h, w)
        masks = [assignment[j] == n.sub for j, n in enumerate(rows)]
    what = "crop" if result.source == "crops" else "token"
    captions = [f"{'query' if n.rank == 0 else f'#{n.rank}  {n.score:.3f}'}\n"
                f"{f'img {n.image}' if n.image >= 0 else 'photo'} {what} {n.sub}  {Path(n.path).name[:16]}" for n in rows]
    return contact_sheet(out, views, captions, boxes=[n.box for n in rows], masks=masks,
                         text=result.query.get("text"))


def neighbours_table(result: QueryResult) -> Table:
    """The query's own row (if any) then the neighbours as a rich table: rank, score, image, crop
    box or token, path; the caption says whether the query is counted."""
    what = "crop (x0,y0,x1,y1)" if result.source == "crops" else "token"
    table = Table(title=f"neighbours of {json.dumps(result.query)}", caption=result.note())
    for col in ("rank", "score", "image", what, "path"):
        table.add_column(col, justify="right" if col in ("rank", "score", "image") else "left")
    for n in result.rows():
        sub = f"{n.sub} ({', '.join(f'{v:.2f}' for v in n.box)})" if n.box else str(n.sub)
        table.add_row("query" if n.rank == 0 else str(n.rank), f"{n.score:.4f}", str(n.image) if n.image >= 0 else "-", sub, n.path,
                      end_section=n.rank == 0)  # a rule sets the query apart from its k neighbours
    return table
