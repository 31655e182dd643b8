"""The pre-tokenised copies of text-only shards (`python -m pipelines.pretokenize`): one Parquet
file per source file under `data.encoded_dir/<fingerprint of the tokenizer and layout>/`, stamped
with its source's size and time, which training reads instead of tokenising as it streams."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from vipoly.data.tokenize import text_encoder, tokenize_table

ENCODING_VERSION = 3  # bump when the encoded layout changes: old copies then stop matching


def fingerprint(inputs_dir: str | Path) -> str:
    """What a text row's encoding depends on: the tokenizer file, max_length and this layout."""
    return _fingerprint(str(inputs_dir))


@lru_cache(maxsize=4)
def _fingerprint(inputs_dir: str) -> str:  # hashing a 150k-token vocabulary once per process, not per file
    import hashlib

    enc = text_encoder(inputs_dir)
    digest = hashlib.sha256(enc.tokenizer.to_str().encode())
    digest.update(f"{enc.max_length}/{ENCODING_VERSION}".encode())
    return digest.hexdigest()[:16]


def encoded_copy(source: str | Path, cache: str | Path, inputs_dir: str | Path) -> Path:
    """Where the pre-encoded copy of one canonical file lives: cache/<fingerprint>/<path hash>-<name>."""
    import hashlib

    source = Path(source).resolve()
    return Path(cache) / fingerprint(inputs_dir) / f"{hashlib.sha1(str(source).encode()).hexdigest()[:12]}-{source.name}"


def _stamp(source: Path) -> dict[bytes, bytes]:
    st = source.stat()
    return {b"vipoly.source": str(source).encode(), b"vipoly.source_bytes": str(st.st_size).encode(),
            b"vipoly.source_mtime_ns": str(st.st_mtime_ns).encode()}


def encoded_files(files: list[str], cache: str | Path | None, inputs_dir: str | Path) -> list[str] | None:
    """The pre-encoded copies of `files`, in order, when every one exists and was made from the
    file as it is now (size and mtime); else None (the source is then encoded as it streams)."""
    import pyarrow.parquet as pq

    if not cache or not Path(cache).is_dir():
        return None
    out = []
    for f in files:
        copy = encoded_copy(f, cache, inputs_dir)
        if not copy.is_file():
            return None
        stamp = _stamp(Path(f).resolve())
        meta = pq.read_schema(copy).metadata or {}
        if any(meta.get(k) != v for k, v in stamp.items()):
            return None
        out.append(str(copy))
    return out


def tokenize_file(source: str, cache: str, inputs_dir: str, chunk_rows: int = 4096) -> dict[str, Any]:
    """Write the pre-encoded copy of one canonical file (text-only files; a file with images is
    left to the streaming encoder, since its patches would be ~100× its JPEG bytes): the same rows
    in the same order and the same row groups, so a range of the source's rows is a range of whole
    row groups of the copy too. Written to a temporary name and renamed, so a copy is whole or
    absent."""
    import os

    import pyarrow.parquet as pq

    src = Path(source).resolve()
    out = encoded_copy(src, cache, inputs_dir)
    reader = pq.ParquetFile(src)
    image_columns = [c for c in ("query_images", "pos_images") if c in reader.schema_arrow.names]
    if image_columns:
        for batch in reader.iter_batches(batch_size=chunk_rows, columns=image_columns):
            if any(pc.sum(pc.list_value_length(batch.column(c))).as_py() for c in image_columns):
                return {"source": str(src), "rows": 0, "skipped": "has images"}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    writer, rows = None, 0
    try:
        for g in range(reader.num_row_groups):
            parts = [tokenize_table(pa.Table.from_batches([batch]), str(inputs_dir))
                     for batch in reader.iter_batches(batch_size=chunk_rows, row_groups=[g])]
            if not parts:
                continue
            table = pa.concat_tables(parts)
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema.with_metadata(_stamp(src)))
            writer.write_table(table, row_group_size=max(1, table.num_rows))  # one group, as in the source
            rows += table.num_rows
    except BaseException:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)  # no half-written copy left behind
        raise
    if writer is None:
        return {"source": str(src), "rows": 0, "skipped": "empty"}
    writer.close()
    os.replace(tmp, out)
    return {"source": str(src), "rows": rows, "path": str(out)}


def default_cache(data) -> str | None:
    """`data.encoded_dir`, or `<data.root>/_encoded` when that is unset ("" turns it off)."""
    from vipoly.data.shards import ENCODED_DIR

    if data.encoded_dir is not None:
        return data.encoded_dir or None
    return str(Path(data.root) / ENCODED_DIR) if data.root else None
