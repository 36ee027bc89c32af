"""What the commands show while they work: the extract job's progress bar and its summary."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

from zeroseg.pipeline.runner import ExtractConfig, Summary, run_extract
from zeroseg.stores.features import FeatureStore


class _RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed:.1f} images/s" if task.speed else "- images/s", style="cyan")


def extract_with_progress(images: str, url: str, config: ExtractConfig, console: Console) -> Summary:
    """run_extract with a progress bar (images/s, ETA) and a printed summary."""
    bar = Progress(
        TextColumn("extract"), BarColumn(), MofNCompleteColumn(), _RateColumn(), TimeRemainingColumn(),
        console=console, transient=False,
    )
    task = None

    def started(store: FeatureStore, todo: int) -> None:
        nonlocal task
        console.print(f"{url}: {store.n_images} images, {todo} to do in {len(store.pending_chunks())} of "
                      f"{store.n_chunks} chunks; teacher {store.config.teacher.arch} "
                      f"({store.config.teacher.pretrained}), {store.n_crops} crops per image")
        task = bar.add_task("extract", total=todo)
        bar.start()

    try:
        summary = run_extract(images, url, config, notify=console.print, started=started,
                              progress=lambda r: bar.advance(task, r.n_images))
    finally:
        bar.stop()
    console.print(format_summary(summary))
    return summary


def format_summary(s: Summary) -> str:
    lines = [f"{s.ok} ok, {s.failed} failed, {s.pending} pending of {s.n_images} images"
             f" ({s.done_this_run} this run in {s.seconds:.1f} s, {s.images_per_s:.1f} images/s)"]
    if s.reasons:
        lines.append("failed: " + ", ".join(f"{n} {kind}" for kind, n in s.reasons.items()))
    for chunk, why in sorted(s.lost_chunks.items()):
        lines.append(f"chunk {chunk} left pending: {why}")
    if s.pending:
        lines.append("re-run the same command to finish the pending chunks")
    return "\n".join(lines)
