"""Reading planned rows from Parquet on any filesystem, a row range at a time, counting the bytes.

- `open_file(path)`: local paths, `file://`, and any URI pyarrow knows (`s3://`, `gs://`, `hdfs://`),
  else through fsspec (which `datasets` brings) wrapped as a pyarrow filesystem.
- `RowReader.read(path, start, stop)`: rows [start, stop) of a file. It reads only the row groups
  that hold them, in one scan, streaming page by page (`pre_buffer=False`, a read buffer), and
  keeps the scan open, so a range that continues the previous one reads on instead of starting
  the row group again: a lane reading its slice window by window reads each row group once.
- `LaneCursor`: one lane of one source (vipoly.data.plan): holds the raw rows (JPEG bytes, not
  patches) of the window it is handing out, and nothing else.
"""
from __future__ import annotations

import io
from functools import lru_cache
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vipoly.data.tokenize import SIDES

READ_BUFFER = 1 << 20  # bytes per column read at a time: memory stays flat whatever the row group size


@lru_cache(maxsize=16)
def _root_fs(root: str):
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(root)[0]
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
        import fsspec
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        return PyFileSystem(FSSpecHandler(fsspec.core.url_to_fs(root)[0]))


def filesystem(path: str):
    """(pyarrow filesystem, path inside it) of a local path or a URI; one filesystem per bucket."""
    import pyarrow.fs as pafs

    if "://" not in path:
        return pafs.LocalFileSystem(), path
    scheme, rest = path.split("://", 1)
    if scheme == "file":
        return pafs.LocalFileSystem(), rest
    return _root_fs(f"{scheme}://{rest.split('/', 1)[0]}"), rest


def open_file(path: str):
    fs, inner = filesystem(path)
    return fs.open_input_file(inner)


@lru_cache(maxsize=8192)
def footer(path: str) -> pq.FileMetaData:
    """A Parquet file's footer (row counts, row groups), reading nothing else; kept per process,
    so that reopening a file for another row range reads no footer again (pyarrow reads the
    file's last 64 KiB to find one)."""
    with open_file(path) as f:
        return pq.ParquetFile(f).metadata


def list_parquet(uri: str) -> list[str]:
    """Parquet files under a folder URI (recursive), as URIs with the same scheme, sorted."""
    import pyarrow.fs as pafs

    fs, base = filesystem(uri)
    info = fs.get_file_info(base)
    scheme = uri.split("://", 1)[0] + "://" if "://" in uri else ""
    if info.type == pafs.FileType.File:
        return [uri]
    if info.type != pafs.FileType.Directory:
        return []
    found = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    return sorted(scheme + f.path for f in found if f.type == pafs.FileType.File and f.path.endswith(".parquet"))


class _Counted(io.RawIOBase):
    """A pyarrow input file as a Python file that counts the bytes read through it."""

    def __init__(self, native, counter: list[int]):
        self.native, self.counter = native, counter

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.native.seek(offset, whence)

    def tell(self) -> int:
        return self.native.tell()

    def read(self, n: int = -1) -> bytes:
        data = self.native.read() if n is None or n < 0 else self.native.read(n)
        self.counter[0] += len(data)
        return data

    def readinto(self, buf) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self.native.close()
        super().close()


class RowReader:
    """Row ranges of Parquet files with one open scan (see the module docstring); `bytes_read`.
    Each reader opens its own file: a ParquetFile shared by the lanes' interleaved scans was
    tried, and a training worker then aborted on a corrupted heap (malloc: unaligned tcache chunk)."""

    def __init__(self, batch_rows: int = 1024, counter: list[int] | None = None, skip: tuple[str, ...] = ()):
        self.batch_rows = batch_rows
        self.skip = skip  # columns left unread
        self._columns: list[str] | None = None  # what a scan reads (None: every column)
        self.counter = counter if counter is not None else [0]
        self._path: str | None = None
        self._next = -1
        self._file = self._pf = self._scan = self._pending = None
        self._bounds = np.zeros(1, dtype=np.int64)  # first row of each row group, then the file's rows
        self._scanned = 0  # row groups given to a scan so far

    @property
    def bytes_read(self) -> int:
        return self.counter[0]

    def read(self, path: str, start: int, stop: int) -> pa.Table:
        if path != self._path:
            self._open(path)
        if start != self._next:
            self._seek(start)
        parts, need = [], stop - start
        while need > 0:
            if self._pending is None or self._pending.num_rows == 0:
                self._pending = self._next_batch(stop)
            take = min(need, self._pending.num_rows)
            parts.append(self._pending.slice(0, take))
            self._pending = self._pending.slice(take)
            need -= take
        self._next = stop
        return pa.concat_tables(parts) if len(parts) > 1 else parts[0]

    def _open(self, path: str) -> None:
        self.close()
        self._file = _Counted(open_file(path), self.counter)
        meta = footer(path)
        self._pf = pq.ParquetFile(self._file, metadata=meta, pre_buffer=False, buffer_size=READ_BUFFER)
        names = self._pf.schema_arrow.names
        self._columns = [n for n in names if n not in self.skip] if any(n in self.skip for n in names) else None
        self._bounds = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
        self._path = path

    def _seek(self, start: int) -> None:
        """Start a new scan at the row group holding `start`; read past the rows before it (the only slack)."""
        g = int(np.searchsorted(self._bounds, start, side="right")) - 1
        self._scan, self._pending, self._scanned = None, None, g
        self._next = int(self._bounds[g])
        if start > self._next:
            self.read(self._path, self._next, start)

    def _next_batch(self, stop: int) -> pa.Table:
        """The scan's next batch. A scan covers the row groups up to the one holding row stop − 1 in
        one `iter_batches` call (one call per row group cost ~0.3 ms, more than decoding a
        256-row group of tokens), so it never reads a group the read does not need; a read that
        continues past them starts the next scan there."""
        while True:
            batch = next(self._scan, None) if self._scan is not None else None
            if batch is not None:
                return pa.Table.from_batches([batch])
            last = int(np.searchsorted(self._bounds, stop - 1, side="right"))  # one past the group of stop − 1
            if self._scanned >= min(last, len(self._bounds) - 1):
                raise ValueError(f"{self._path}: rows up to {stop} run past the end of the file "
                                 f"({int(self._bounds[-1])} rows); did it change?")
            groups = list(range(self._scanned, min(last, len(self._bounds) - 1)))
            self._scan = self._pf.iter_batches(batch_size=self.batch_rows, row_groups=groups, columns=self._columns,
                                               use_threads=False)
            self._scanned = groups[-1] + 1

    def close(self) -> None:
        self._scan = self._pending = self._pf = None
        if self._file is not None:
            self._file.close()
        self._file = None
        self._path, self._next = None, -1


IMAGE_COLUMNS = tuple(f"{side}_{k}" for side in SIDES for k in ("pixel_values", "image_grid_thw"))
"""An encoded row's image columns (vipoly.data.tokenize's layout)."""

WINDOW_BYTES = 1 << 20
"""Raw bytes a lane reads at a time (whole shuffle blocks, at least one): reads of a few rows cost
~0.1 ms each in pyarrow, so a lane reads ahead by bytes, not by its block size."""
MAX_WINDOW_ROWS = 4096


def window_rows(files: list[str]) -> int:
    """Rows that make about WINDOW_BYTES of these files, from their footers."""
    rows = size = 0
    for f in files:
        meta = footer(f)
        rows += meta.num_rows
        size += sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))
    return int(min(MAX_WINDOW_ROWS, max(1, WINDOW_BYTES * rows // max(size, 1))))


class Bad:
    """A selected row that failed to encode: its id and why (the stream replaces and quarantines it)."""

    __slots__ = ("id", "reason")

    def __init__(self, row_id: str, reason: str):
        self.id, self.reason = row_id, reason


class LaneCursor:
    """One lane of one source (vipoly.data.plan), as a worker reads it: `take(js)` finds the lane's
    samples `js` (ascending) in the windows it reads. It holds one *window*: whole shuffle blocks of
    its slice, about WINDOW_BYTES of raw rows (JPEG bytes, never patches), read in one range. A
    window of text rows is tokenised when it is read, in one batched call (`inputs_dir`); the
    pre-encoded copies (`encoded`) need nothing; rows with images stay raw (decoded in Ray tasks
    after the selection). `replacement(j, r)` reads the row that fills the r-th bad slot of sample
    j's pass."""

    def __init__(self, plan, name: str, lane: int, files: list[str], counter: list[int], encoded: bool = False,
                 inputs_dir: str | None = None):
        self.plan, self.name, self.lane, self.files, self.encoded = plan, name, lane, files, encoded
        self.inputs_dir = inputs_dir
        block, rows = plan.block[lane], window_rows(files)
        self.span = max(1, rows // block) * block
        # A scan keeps the rest of its last batch for the next read: ~1 MiB batches keep that small.
        # A pre-encoded copy holds text rows only: its image columns are empty lists in every row,
        # and reading them cost about a third of a text row's read.
        self.reader = RowReader(batch_rows=max(16, min(1024, rows // 4)), counter=counter,
                                skip=IMAGE_COLUMNS if encoded else ())
        self._window = (-1, 0, 0)  # (epoch, first slice index, rows)
        self._table = self._order = self._where = None
        self._raw = False  # whether _table holds raw rows (with images) rather than encoded ones
        self._bad: dict[int, Bad] = {}

    def _load(self, epoch: int, x: int) -> None:
        from vipoly.data.tokenize import tokenize_rows, has_images
        from vipoly.data.blocks import EncodedBlock

        block, n = self.plan.block[self.lane], self.plan.lane_rows(self.name, self.lane)
        first = x // block * block
        # Windows start at a 16th of `span` and grow 4× a load, from the start of each pass: a
        # worker's first batches draw from every lane it owns, and full windows for all of them at
        # once (64 lanes × 4,096 text rows to tokenise) held the first batch back by seconds;
        # growing by 2× from one block cost a fifth of the rate in window loads.
        start = max(block, self.span // 16 // block * block)
        previous = self._window[2] if self._window[0] == epoch else 0
        rows = min(self.span, max(start, 4 * previous // block * block), n - first)
        parts = [self.reader.read(self.files[s.file], s.start, s.stop)
                 for s in self.plan.block_segments(self.name, self.lane, epoch, first, rows)]
        table = pa.concat_tables(parts, promote_options="permissive") if len(parts) > 1 else parts[0]
        table = table.replace_schema_metadata(None).combine_chunks()
        self._order = self.plan.window_order(self.name, self.lane, epoch, first, rows)
        self._table, self._where, self._bad, self._raw = table, None, {}, False
        if self.encoded:
            self._table = EncodedBlock(table)
        elif self.inputs_dir is None or has_images(table):
            self._raw = True
        else:
            encoded, bad = tokenize_rows(table, self.inputs_dir)
            self._bad = {i: Bad(row_id, reason) for i, row_id, reason in bad}
            good = np.ones(table.num_rows, dtype=bool)
            good[list(self._bad)] = False
            self._where = np.where(good, np.cumsum(good) - 1, -1)  # raw row → encoded row (−1: bad)
            self._table = EncodedBlock(encoded) if encoded is not None else None  # the raw text is not needed now
        self._window = (epoch, first, rows)

    def take(self, js: np.ndarray) -> tuple[list[tuple[np.ndarray, Any, np.ndarray, bool]], list[tuple[int, Bad]]]:
        """Where the lane's samples `js` (ascending) are, a window at a time: ([(which, rows, at,
        raw)], [(k, Bad)]). `which` indexes `js`; `at` are rows of `rows`: the window's
        `EncodedBlock`, or its raw table when `raw` (rows with images, to encode after the
        selection). The Bads are text rows that failed to tokenise when their window was read
        (sample js[k])."""
        n = self.plan.lane_rows(self.name, self.lane)
        parts, bad, lo = [], [], 0
        while lo < len(js):
            epoch, x = divmod(int(js[lo]), n)
            e, first, rows = self._window
            if e != epoch or not first <= x < first + rows:
                self._load(epoch, x)
                e, first, rows = self._window
            hi = int(np.searchsorted(js, e * n + first + rows))  # the window's samples: a run of js
            which = np.arange(lo, hi)
            at = self._order[js[lo:hi] - (e * n + first)]
            if self._where is not None:
                encoded = self._where[at]
                ok = encoded >= 0
                bad += [(lo + int(k), self._bad[int(at[k])]) for k in np.flatnonzero(~ok)]
                parts.append((which[ok], self._table, encoded[ok], False))
            else:
                parts.append((which, self._table, at, self._raw))
            lo = hi
        return parts, bad

    def replacement(self, j: int, r: int) -> pa.Table:
        """The raw row that fills the r-th bad slot met in the pass of sample j: the lane's last
        slice index not yet used as one (n − 1 − r), read off the lane's own scan."""
        epoch, _ = self.plan.lane_epoch(self.name, self.lane, j)
        block, n = self.plan.block[self.lane], self.plan.lane_rows(self.name, self.lane)
        if r >= n:
            raise ValueError(f"source {self.name!r}: every row of lane {self.lane} failed to decode in pass {epoch}")
        x = n - 1 - r
        first = x // block * block
        order = self.plan.window_order(self.name, self.lane, epoch, first, min(block, n - first))
        seg = self.plan.block_segments(self.name, self.lane, epoch, first + int(order[x - first]), 1)[0]
        side = RowReader(batch_rows=16, counter=self.reader.counter)
        try:
            return side.read(self.files[seg.file], seg.start, seg.stop)
        finally:
            side.close()

    def close(self) -> None:
        self.reader.close()
        self._table = self._order = self._where = None
