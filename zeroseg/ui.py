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


class _WaitColumn(ProgressColumn):
    """The last chunk's share of time its teacher waited for decoded images."""

    def render(self, task) -> Text:
        wait = task.fields.get("wait")
        return Text("" if wait is None else f"waited {wait:.0%}", style="dim")


def extract_with_progress(images: str, url: str, config: ExtractConfig, console: Console) -> Summary:
    """run_extract with a progress bar (images/s, ETA) and a printed summary."""
    bar = Progress(
        TextColumn("extract"), BarColumn(), MofNCompleteColumn(), _RateColumn(), _WaitColumn(), TimeRemainingColumn(),
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
                              progress=lambda r: bar.update(task, advance=r.n_images, wait=r.wait_share))
    finally:
        bar.stop()
    console.print(format_summary(summary))
    return summary


def format_summary(s: Summary) -> str:
    lines = [f"{s.ok} ok, {s.failed} failed, {s.pending} pending of {s.n_images} images"
             f" ({s.done_this_run} this run in {s.seconds:.1f} s, {s.images_per_s:.1f} images/s"
             + (f", teacher waited {s.wait_share:.0%} of its time for decoded images" if s.chunk_s else "")
             + (f", {s.copied_this_run} duplicates copied, not embedded" if s.copied_this_run else "") + ")"]
    if s.reasons:
        lines.append("failed: " + ", ".join(f"{n} {kind}" for kind, n in s.reasons.items()))
    for chunk, why in sorted(s.lost_chunks.items()):
        lines.append(f"chunk {chunk} left pending: {why}")
    if s.pending:
        lines.append("re-run the same command to finish the pending chunks")
    return "\n".join(lines)
