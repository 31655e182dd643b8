"""Reading planned rows from Parquet on any filesystem, a row range at a time, counting the bytes.

- `open_file(path)`: local paths, `file://`, and any URI pyarrow knows (`s3://`, `gs://`, `hdfs://`),
  else through fsspec (which `datasets` brings) wrapped as a pyarrow filesystem.
- `RowReader.read(path, start, stop)`: rows [start, stop) of a file. It reads only the row groups
  that hold them, streaming page by page (`pre_buffer=False`, a read buffer), and keeps its scan
  open, so a range that continues the previous one reads on instead of starting the row group
  again: a lane reading its slice block by block reads each row group once.
- `LaneCursor`: one lane of one source (vipoly.data.plan): holds the raw rows (JPEG bytes, not
  patches) of the block it is handing out, and nothing else.
"""
from __future__ import annotations

import io
from functools import lru_cache
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

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
    """Row ranges of Parquet files with one open scan (see the module docstring); `bytes_read`."""

    def __init__(self, batch_rows: int = 1024, counter: list[int] | None = None):
        self.batch_rows = batch_rows
        self.counter = counter if counter is not None else [0]
        self._path: str | None = None
        self._next = -1
        self._file = self._scan = self._pending = None

    @property
    def bytes_read(self) -> int:
        return self.counter[0]

    def read(self, path: str, start: int, stop: int) -> pa.Table:
        if (path, start) != (self._path, self._next):
            self._open(path, start)
        parts, need = [], stop - start
        while need > 0:
            if self._pending is None or self._pending.num_rows == 0:
                batch = next(self._scan, None)
                if batch is None:
                    raise ValueError(f"{path}: rows [{start}, {stop}) run past the end of the file; did it change?")
                self._pending = pa.Table.from_batches([batch])
            take = min(need, self._pending.num_rows)
            parts.append(self._pending.slice(0, take))
            self._pending = self._pending.slice(take)
            need -= take
        self._next = stop
        return pa.concat_tables(parts) if len(parts) > 1 else parts[0]

    def _open(self, path: str, start: int) -> None:
        self.close()
        self._file = _Counted(open_file(path), self.counter)
        meta = footer(path)
        pf = pq.ParquetFile(self._file, metadata=meta, pre_buffer=False, buffer_size=READ_BUFFER)
        rows = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
        g = int(np.searchsorted(rows, start, side="right")) - 1
        self._scan = self._groups(pf, g, meta.num_row_groups)
        self._path, self._next, self._pending = path, int(rows[g]), None
        if start > self._next:  # the head of the first row group: read past it (the only slack)
            self.read(path, self._next, start)

    def _groups(self, pf: pq.ParquetFile, first: int, end: int):
        """Batches of row groups first, first+1, … — one group at a time: a batch reader over several
        groups fills its batches across their boundary, reading the next group's pages early."""
        for g in range(first, end):
            yield from pf.iter_batches(batch_size=self.batch_rows, row_groups=[g], use_threads=False)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = self._scan = self._pending = None
        self._path, self._next = None, -1


WINDOW_BYTES = 4 << 20
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
    """One lane of one source (vipoly.data.plan), as a worker reads it: `rows(js)` gives, for the
    lane's samples `js` (ascending), one item each: a `BlockRow` handle of an encoded row, a `Bad`,
    or `(table, i)`, row i of a raw table still to be encoded (rows with images: decoded in Ray
    tasks after the selection). It holds one *window*: whole shuffle blocks of its slice, about
    WINDOW_BYTES of raw rows (JPEG bytes, never patches), read in one range. A window of text rows
    is tokenised when it is read, in one batched call (`model_dir`); the pre-encoded copies
    (`encoded`) need nothing. `replacement(j, r)` reads the row that fills the r-th bad slot of
    sample j's pass."""

    def __init__(self, plan, name: str, lane: int, files: list[str], counter: list[int], encoded: bool = False,
                 model_dir: str | None = None):
        self.plan, self.name, self.lane, self.files, self.encoded = plan, name, lane, files, encoded
        self.model_dir = model_dir
        block, rows = plan.block[lane], window_rows(files)
        self.span = max(1, rows // block) * block
        # A scan keeps the rest of its last batch for the next read: ~1 MiB batches keep that small.
        self.reader = RowReader(batch_rows=max(16, min(1024, rows // 4)), counter=counter)
        self._window = (-1, 0, 0)  # (epoch, first slice index, rows)
        self._table = self._block = self._order = self._where = None
        self._bad: dict[int, Bad] = {}

    def _load(self, epoch: int, x: int) -> None:
        from vipoly.data.encode import EncodedBlock, encode_rows, has_images

        block, n = self.plan.block[self.lane], self.plan.lane_rows(self.name, self.lane)
        first = x // block * block
        rows = min(self.span, n - first)
        parts = [self.reader.read(self.files[s.file], s.start, s.stop)
                 for s in self.plan.block_segments(self.name, self.lane, epoch, first, rows)]
        table = pa.concat_tables(parts, promote_options="permissive") if len(parts) > 1 else parts[0]
        table = table.replace_schema_metadata(None).combine_chunks()
        self._order = self.plan.window_order(self.name, self.lane, epoch, first, rows)
        self._table, self._block, self._where, self._bad = table, None, None, {}
        if self.encoded:
            self._block = EncodedBlock(table)
        elif self.model_dir is not None and not has_images(table):
            encoded, bad = encode_rows(table, self.model_dir)
            self._bad = {i: Bad(row_id, reason) for i, row_id, reason in bad}
            self._where = np.cumsum([i not in self._bad for i in range(table.num_rows)]) - 1
            self._block = EncodedBlock(encoded) if encoded is not None else None
            self._table = None  # the raw text is not needed any more
        self._window = (epoch, first, rows)

    def _index(self, j: int) -> int:
        epoch, x = self.plan.lane_epoch(self.name, self.lane, j)
        e, first, rows = self._window
        if e != epoch or not first <= x < first + rows:
            self._load(epoch, x)
            first = self._window[1]
        return int(self._order[x - first])

    def rows(self, js: list[int]) -> list:
        from vipoly.data.encode import BlockRow

        out = []
        for j in js:
            i = self._index(j)
            if self._where is not None:  # text tokenised at load
                out.append(self._bad[i] if i in self._bad else BlockRow(self._block, int(self._where[i])))
            elif self._block is not None:  # pre-encoded
                out.append(BlockRow(self._block, i))
            else:  # rows with images: encoded after the selection
                out.append((self._table, i))
        return out

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
        self._table = self._block = self._where = None
