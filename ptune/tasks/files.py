"""Reading a task's local CSV/TSV file, with one PtuneError line for every way it can be wrong.

    read_table(path, columns, delimiter) -> [{column: text, ...}, ...]   (file order)

A user's data file can be missing, empty, cut short by a copy, not UTF-8, written with the other
delimiter, short of a column, or hold a row with an empty field; each is reported with the file,
the line and the fix, before a run directory exists. Columns beyond `columns` are allowed and kept.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from ptune.errors import PtuneError

_NAMES = {",": "comma", "\t": "tab"}


def read_table(path: Path, columns: tuple[str, ...], delimiter: str, quoting: int = csv.QUOTE_MINIMAL,
               exact_header: bool = False, allowed: dict[str, tuple[str, ...]] | None = None) -> list[dict]:
    """Rows of a delimited text file whose first line names its columns; every `columns` field
    must be non-empty. exact_header: the header must be `columns` and nothing else (GLUE's TSVs).
    allowed: {column: the values it may take} (e.g. class labels)."""
    path = Path(path)
    kind = "TSV" if delimiter == "\t" else "CSV"
    want = delimiter.join(columns).replace("\t", "<TAB>")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PtuneError(f"{path}: not UTF-8 text (byte {e.start}); expected a {kind} with the header {want}") from None
    if not text.strip():
        raise PtuneError(f"{path} is empty; expected a {kind} with the header {want} and one row per example")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting, strict=True)
    header = next(reader)
    other = next((d for d in _NAMES if d != delimiter and d in "".join(header)), None)
    if (header != list(columns)) if exact_header else not set(columns) <= set(header):
        hint = f" (it looks {_NAMES[other]}-separated)" if other and len(header) == 1 else ""
        raise PtuneError(f"{path}: expected a {kind} with the header {want}, found {header}{hint}")
    rows = []
    try:
        for fields in reader:
            n = reader.line_num
            if not fields:  # a blank line
                continue
            if len(fields) != len(header):
                raise PtuneError(f"{path}, line {n}: {len(fields)} field(s) where the header has {len(header)} "
                                 f"(a missing column, a stray delimiter, or a file cut short); fix or remove the line")
            row = dict(zip(header, fields))
            empty = next((c for c in columns if not row[c].strip()), None)
            if empty is not None:
                raise PtuneError(f"{path}, line {n}: empty {empty!r}; every row needs text in {', '.join(columns)}")
            bad = next((c for c, ok in (allowed or {}).items() if row[c] not in ok), None)
            if bad is not None:
                raise PtuneError(f"{path}, line {n}: {bad} {row[bad]!r} is not one of {', '.join(allowed[bad])}; "
                                 f"fix the line or the file's {bad} column")
            rows.append(row)
    except csv.Error as e:
        raise PtuneError(f"{path}, line {reader.line_num}: {e} (an unclosed quote, or a file cut short); "
                         f"fix the line or copy the file again") from None
    if not rows:
        raise PtuneError(f"{path} has a header but no rows; add examples or point task.data_dir at the full data")
    return rows
