"""Where zeroseg may write: output folders it claimed, and files replaced whole.

An output folder (`index build --out`, `train --out`, `ablate --out`, `demo --out`, `scenes OUT`,
`store export OUT`) is claimed by a marker file, `zeroseg-output.json` ({"kind",
"zeroseg_version", "created"}), written before anything else goes in. `claim_output_dir` then allows only:

    missing or empty folder        created and claimed: a new output
    our marker, the same kind      ours: the caller resumes (or rebuilds) it
    anything else                  refused in one line (UserError), not a byte touched

so a user's folder, or another kind of zeroseg output, is never written into by mistake.

`write_atomic` replaces a file whole (a temporary file in the same folder, then a rename): a
reader or a crash sees the old content or the new, never half of it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import zeroseg
from zeroseg.errors import UserError

MARKER = "zeroseg-output.json"
KINDS = ("index", "train", "ablation", "demo", "scenes", "export")


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _our_temporary(name: str) -> bool:
    """A marker's temporary file left by a claim killed mid-write: the folder is still empty."""
    return name.startswith(f".{MARKER}.") and name.endswith(".tmp")


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write `data` to `path` through a temporary file and a rename (atomic on one filesystem)."""
    path = Path(path)
    tmp = _temporary(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def canonical_location(url: str) -> str:
    """Where a path leads, for comparing and hashing: a local path absolute and normalised
    (./s.zarr, s.zarr/ and /abs/s.zarr are one place); a URL (s3://, memory://) as given."""
    return url if "://" in url else os.path.abspath(url)


def output_kind(path: str | Path) -> str | None:
    """The kind of zeroseg output `path` holds by its marker; None when it has no marker."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        return None
    try:
        return str(json.loads(marker.read_text())["kind"])
    except (ValueError, KeyError, TypeError):
        return "unreadable"


def check_output_dir(path: str | Path, kind: str) -> bool:
    """Refuse `path` unless it is missing, empty or a zeroseg output folder of `kind`; writes
    nothing. True when it already is one of ours (the caller resumes or rebuilds it)."""
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file, not a folder: choose a new or empty folder for the {kind} output")
    have = output_kind(path) if path.is_dir() else None
    if have == kind:
        return True
    if have is not None:
        raise UserError(f"{path} holds a zeroseg {have} output, not a {kind} output: choose another folder")
    if path.is_dir() and any(not _our_temporary(p.name) for p in path.iterdir()):
        raise UserError(
            f"{path} is not empty and zeroseg did not make it (no {MARKER}): choose a new or empty "
            f"folder for the {kind} output; nothing in it was touched"
        )
    return False


def claim_output_dir(path: str | Path, kind: str) -> bool:
    """Make `path` a zeroseg output folder of `kind`, or refuse (check_output_dir). True when it
    already was one (the caller resumes), False when it was just created or claimed empty."""
    if check_output_dir(path, kind):
        return True
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    marker = {"kind": kind, "zeroseg_version": zeroseg.__version__, "created": time.time()}
    write_atomic(path / MARKER, json.dumps(marker) + "\n")
    return False
