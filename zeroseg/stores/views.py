"""One view from a store row: what the teacher embedded for it, for every reader of a store.

A store holds each row's training view (images/pixels) or only its path. Without pixels, the
path is decoded again by the extractor's own `decode_image`, with the store's view size and
grids, so the trainer, the online teacher, `index build --source segments` and the contact
sheet all see the very pixels the features were made from. No other code makes a view of a row.
"""

from __future__ import annotations

from concurrent.futures import Executor
from typing import Sequence

import numpy as np

from zeroseg.decode import decode_image
from zeroseg.errors import UserError
from zeroseg.stores.features import FeatureStore


def row_views(store: FeatureStore, rows: slice | Sequence[int] | np.ndarray, pool: Executor | None = None) -> np.ndarray:
    """The training views (n, S, S, 3) uint8 of `rows` (a slice, or row indices in any order,
    repeats allowed). Files are decoded in `pool` when given (decoding releases the GIL). A row
    whose file no longer decodes is a UserError naming the row, its path and the reason."""
    s = store.config.view_size
    if isinstance(rows, slice):
        index, select = np.arange(*rows.indices(store.n_images)), rows
    else:
        index = np.asarray(rows, np.int64).reshape(-1)
        select = index
    if len(index) == 0:
        return np.zeros((0, s, s, 3), np.uint8)

    def read(array):  # a slice reads whole chunks; indices go through zarr's orthogonal selection
        return array[select] if isinstance(select, slice) else array.oindex[select]

    if store.has_pixels:
        return read(store.pixels)
    paths = [str(p) for p in read(store.array("images/path"))]  # only these rows' paths
    decode = lambda path: decode_image(path, s, store.config.grids)  # noqa: E731
    decoded = pool.map(decode, paths) if pool else map(decode, paths)
    views = np.zeros((len(paths), s, s, 3), np.uint8)
    for i, (row, path, d) in enumerate(zip(index, paths, decoded)):
        if d.view is None:
            raise UserError(f"cannot read image {row} of {store.url} ({path}): {d.error}")
        views[i] = d.view
    return views
