"""Training data: documents from local text, JSONL or parquet files (through `datasets`), tokenized with a
tokenizer from a local folder, concatenated with an end-of-document token, and cut into fixed-length rows.

A row is one packed sequence of ``row_len`` tokens; ``cu_seqlens`` marks where its documents start (and,
with a ``context``, every ``context`` tokens: the micro-batch's sequences), so no state and no convolution
crosses a document or sequence boundary, and no token is trained to predict the next document. Rows are
addressed by index, so the data position is a number that a checkpoint can keep.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

FORMATS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def load_tokenizer(folder):
    """A `tokenizers.Tokenizer` from ``folder/tokenizer.json``."""
    from tokenizers import Tokenizer

    file = Path(folder, "tokenizer.json")
    if not file.exists():
        raise FileNotFoundError(f"no tokenizer.json in {folder}")
    return Tokenizer.from_file(str(file))


def read_documents(files, text_field="text") -> list[str]:
    """Every document of ``files`` (one kind of file per call): a whole text file is one document; a JSONL /
    JSON / parquet file gives its ``text_field`` of every row. A row without that field, with a value that is
    not a string, or a line that is not JSON is an error naming the file and line, never skipped; empty
    documents are left out, and a file with no text at all is an error naming it."""
    files = [str(f) for f in ([files] if isinstance(files, (str, Path)) else files)]
    if not files:
        raise ValueError("no data files given")
    kinds = {FORMATS.get(Path(f).suffix) for f in files}
    if None in kinds or len(kinds) != 1:
        raise ValueError(f"data files must all be one of {sorted(FORMATS)}, got {files}")
    kind = kinds.pop()
    for f in files:
        if not Path(f).exists():
            raise FileNotFoundError(f"data file {f} does not exist")
    documents = []
    for f in files:
        if kind == "text":
            found = [_read_text(f)]
        elif Path(f).suffix == ".jsonl":
            found = _read_jsonl(f, text_field)
        else:
            found = _read_with_datasets(f, kind, text_field)
        if not any(d.strip() for d in found):
            raise ValueError(f"data file {f} has no text")
        documents += [d for d in found if d]
    return documents


def _read_text(file) -> str:
    try:
        return Path(file).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{file}: not UTF-8 text ({e})") from None


def _read_jsonl(file, field) -> list[str]:
    documents = []
    with open(file, encoding="utf-8", errors="strict") as f:
        try:
            lines = list(f)
        except UnicodeDecodeError as e:
            raise ValueError(f"{file}: not UTF-8 text ({e})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}:{number}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or field not in row:
            keys = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(f"{file}:{number}: no {field!r} field ({keys}); choose the text field "
                             "(data.text_field in dla-train, --text-field in dla-eval)")
        if not isinstance(row[field], str):
            raise ValueError(f"{file}:{number}: {field!r} is a {type(row[field]).__name__}, expected a string")
        documents.append(row[field])
    return documents


def _read_with_datasets(file, kind, field) -> list[str]:
    import datasets

    if Path(file).stat().st_size == 0:  # `datasets` raises a bare StopIteration
        return []
    data = datasets.load_dataset(kind, data_files=[file], split="train")
    if field not in data.column_names:
        raise ValueError(f"{file}: no {field!r} column (columns: {data.column_names}); choose the text field "
                         "(data.text_field in dla-train, --text-field in dla-eval)")
    bad = next((i for i, t in enumerate(data[field]) if t is not None and not isinstance(t, str)), None)
    if bad is not None:
        raise ValueError(f"{file}: row {bad} of {field!r} is a {type(data[field][bad]).__name__}, expected a string")
    return [t for t in data[field] if t]


class PackedTokens:
    """A token stream of documents, each followed by ``eos_id``, cut into rows of ``row_len`` tokens, and
    the rows into sequences of at most ``context`` tokens (None: the whole row); with a ``seed`` the rows
    come in a fixed shuffled order."""

    def __init__(self, documents, tokenizer, eos_id: int, row_len: int, seed: int | None = None,
                 context: int | None = None):
        ids = [np.asarray(e.ids + [eos_id], np.int64) for e in tokenizer.encode_batch(documents)]
        self.tokens = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        self.starts = np.cumsum([0] + [len(x) for x in ids[:-1]])  # document starts in the stream
        self.row_len = row_len
        self.context = context or row_len
        if len(self) == 0:
            raise ValueError(f"{len(self.tokens)} tokens make no row of {row_len}; add data or lower seq_len")
        self.order = np.arange(len(self)) if seed is None else np.random.default_rng(seed).permutation(len(self))

    def __len__(self):
        return len(self.tokens) // self.row_len

    def row(self, index: int):
        """Row ``index`` (wrapping around): (input ids [1, R], labels [1, R] with -100 where the next token
        belongs to another document or the row ends, cu_seqlens [N + 1])."""
        start = int(self.order[index % len(self)]) * self.row_len
        end = start + self.row_len
        ids = torch.from_numpy(self.tokens[start:end])
        inner = self.starts[(self.starts > start) & (self.starts < end)] - start
        cuts = np.union1d(inner, np.arange(self.context, self.row_len, self.context))
        cu = torch.tensor([0, *cuts.tolist(), self.row_len])
        labels = torch.full_like(ids, -100)
        labels[:-1] = ids[1:]
        labels[cu[1:-1] - 1] = -100  # a document's last token does not predict the next document
        return ids[None], labels[None], cu
