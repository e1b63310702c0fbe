"""Where samples come from, and where kept samples go: rows as plain dicts, each with its location.

Sources:

- ``.jsonl`` (one object a line) and ``.json`` (a list): read here, so an error names the line;
- ``.csv`` and ``.parquet`` files, and a folder written by ``datasets``' ``save_to_disk``: read
  through Hugging Face ``datasets``; an error names the row (row 1 is the first row of data). CSV
  cells are read as text, and an empty cell (or a null) counts as a missing field;
- ``hub:OWNER/NAME[/CONFIG][:SPLIT]``: a dataset on the Hugging Face Hub (split ``train`` unless
  named), downloaded into the ``datasets`` cache; it needs the internet the first time.

Local files are read through a temporary ``datasets`` cache, so no copy of them stays behind.
"""

from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path
from typing import Any

from fedqc.errors import FedqcError

HUB = "hub:"
TABULAR = {".csv": "csv", ".parquet": "parquet"}
FORMAT = {"csv": "CSV", "parquet": "Parquet"}
SUFFIXES = (".jsonl", ".json", *TABULAR)
KINDS = "a .jsonl, .json, .csv or .parquet file, a save_to_disk folder or hub:OWNER/NAME"

Row = tuple[str, str, Any]  # (location for an error, label for "first on ...", the row)


def read_rows(source: str | Path) -> list[Row]:
    """The rows of a sample source (module docstring), in order."""
    if str(source).startswith(HUB):
        return _table_rows(str(source), _from_hub(str(source)))
    path = Path(source)
    if path.is_dir():
        return _table_rows(str(path), _from_disk(path))
    if not path.is_file():
        raise FedqcError(f"{path}: file not found")
    if path.suffix in TABULAR:
        return _table_rows(str(path), _from_file(path, TABULAR[path.suffix]))
    if path.suffix not in (".jsonl", ".json"):
        raise FedqcError(f"{path}: unknown file type '{path.suffix}'; use {KINDS}")
    return json_rows(path, read_text(path))


def source_exists(source: str | Path) -> bool:
    """A Hub dataset, or a file or folder that exists (whether it reads: :func:`read_rows`)."""
    return str(source).startswith(HUB) or Path(source).exists()


def client_source(clients: Path, pid: int) -> Path | None:
    """Client ``pid``'s data in a clients folder: ``client-<pid>`` with one of the file suffixes
    above, or a ``client-<pid>/`` save_to_disk folder; None when there is none."""
    found = [clients / f"client-{pid}{suffix}" for suffix in SUFFIXES]
    found = [p for p in found if p.is_file()] + [
        p for p in [clients / f"client-{pid}"] if p.is_dir()
    ]
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise FedqcError(f"{clients}: client {pid} has {names}; keep one")
    return found[0] if found else None


def read_text(path: Path) -> str:
    """A file's UTF-8 text; one line naming the file when it is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise FedqcError(
            f"{path}: not UTF-8 text (byte {exc.start}); re-save it as UTF-8"
        ) from None


def json_rows(path: Path, text: str) -> list[Row]:
    """``file:N``/``line N`` in JSON-lines, ``item N`` in a ``.json`` list."""
    if not text.strip():
        return []
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FedqcError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
        if not isinstance(data, list):
            raise FedqcError(f"{path}: a .json file must hold a list of samples")
        return [(f"{path} (item {i + 1})", f"item {i + 1}", item) for i, item in enumerate(data)]
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"{path}:{number}", f"line {number}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise FedqcError(f"{path}:{number}: malformed JSON ({exc.msg})") from None
    return rows


def write_rows(path: Path, rows: list[dict]) -> None:
    """Write rows in the format ``path``'s suffix names (.jsonl, .json, .csv or .parquet)."""
    if path.suffix == ".jsonl":
        with open(path, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    else:
        import datasets

        columns = list(dict.fromkeys(k for r in rows for k in r))
        table = datasets.Dataset.from_list([{c: r.get(c) for c in columns} for r in rows])
        if path.suffix == ".csv":
            table.to_csv(str(path), index=False)
        else:
            table.to_parquet(str(path))


def check_output(path: Path) -> None:
    """Refuse an output file whose format :func:`write_rows` cannot write."""
    if path.suffix not in SUFFIXES:
        raise FedqcError(
            f"{path}: unknown output type '{path.suffix}'; name it .jsonl, .json, .csv or .parquet"
        )


def _table_rows(name: str, rows: list[dict]) -> list[Row]:
    """Rows of a table, nulls left out (a missing field, as in JSON)."""
    return [
        (f"{name} (row {i})", f"row {i}", {k: v for k, v in r.items() if v is not None})
        for i, r in enumerate(rows, start=1)
    ]


def _from_file(path: Path, builder: str) -> list[dict]:
    import datasets

    _quiet()
    options = _csv_options(path) if builder == "csv" else {}
    with tempfile.TemporaryDirectory() as cache:
        try:
            table = datasets.load_dataset(
                builder, data_files=str(path), split="train", cache_dir=cache, **options
            )
        except Exception as exc:  # datasets wraps pyarrow's and pandas' parse errors
            raise FedqcError(
                f"{path}: not a readable {FORMAT[builder]} file ({_first_line(exc)}); "
                f"re-save it as {FORMAT[builder]}"
            ) from None
        return table.to_list()


def _csv_options(path: Path) -> dict:
    """Every column as text, and only an empty cell as a null (not "NA" or "None")."""
    import datasets

    header = next(csv.reader(read_text(path).splitlines()), [])
    features = datasets.Features({name: datasets.Value("string") for name in header})
    return {"features": features, "keep_default_na": False, "na_values": [""]}


def _from_disk(path: Path) -> list[dict]:
    import datasets

    _quiet()
    try:
        table = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise FedqcError(
            f"{path}: a folder, but not one written by datasets' save_to_disk; use {KINDS}"
        ) from None
    if isinstance(table, datasets.DatasetDict):
        splits = list(table)
        if len(splits) != 1:
            raise FedqcError(
                f"{path}: holds the splits {', '.join(splits)}; name one: {path / splits[0]}"
            )
        table = table[splits[0]]
    return table.to_list()


def _from_hub(source: str) -> list[dict]:
    import datasets

    name, _, split = source[len(HUB) :].partition(":")
    parts = name.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise FedqcError(f"{source}: a hub dataset is hub:OWNER/NAME[/CONFIG][:SPLIT]")
    config = parts[2] if len(parts) == 3 else None
    _quiet()
    try:
        table = datasets.load_dataset("/".join(parts[:2]), config, split=split or "train")
    except Exception as exc:  # offline, unknown id, config or split: the library says which
        raise FedqcError(
            f"{source}: cannot load it from the Hugging Face Hub ({_first_line(exc)}); check the "
            "id, config and split, and the internet connection (or use a save_to_disk folder)"
        ) from None
    return table.to_list()


def _quiet() -> None:
    """No progress bars, and no log lines of the libraries' own: the error says it in one."""
    import datasets
    import huggingface_hub

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    huggingface_hub.logging.set_verbosity(huggingface_hub.logging.CRITICAL)


def _first_line(exc: BaseException) -> str:
    """The first line of the innermost error (datasets wraps the parser's in its own)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
