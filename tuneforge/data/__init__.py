"""Data pipeline: read JSONL/CSV/Parquet rows, validate them, tokenize with exact loss spans, batch and pack.

Public API::

    build_dataset(path, tokenizer, ...) -> TokenizedDataset   # raises DataError listing every problem
    check_file(path, tokenizer=None, ...) -> DataReport        # for `tuneforge data check`; rows never raise
    collate(rows, pad_id) / pack_rows(rows, max_len) / collate_packed(bins, pad_id) / collate_preference(rows, pad_id)
    read_rows(path) -> Iterator[dict]                          # well-formed raw rows, bad ones skipped
"""

from tuneforge.data.collate import block_causal_mask, collate, collate_packed, collate_preference, pack_rows
from tuneforge.data.dataset import TokenizedDataset, build_dataset, check_file
from tuneforge.data.readers import read_rows
from tuneforge.data.report import DataError, DataReport
from tuneforge.data.tokenize import IGNORE, n_supervised

__all__ = [
    "IGNORE",
    "DataError",
    "DataReport",
    "TokenizedDataset",
    "block_causal_mask",
    "build_dataset",
    "check_file",
    "collate",
    "collate_packed",
    "collate_preference",
    "n_supervised",
    "pack_rows",
    "read_rows",
]
