"""Loading samples from JSON / JSONL, CSV, Parquet, a save_to_disk folder and the Hub, in every
schema, and the errors a user can hit."""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
import pytest

from fedqc.data.samples import Sample, load_records, load_samples
from fedqc.data.sources import client_source, source_exists
from fedqc.errors import FedqcError


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "rows,expected",
    [
        (
            [
                {"instruction": "Sum", "input": "2 and 3", "output": "5"},
                {"instruction": "Say hi", "output": "hi"},
                {"instruction": "Say bye", "input": "", "output": "bye"},
            ],
            [
                Sample("0", "Sum\n\n2 and 3", "5"),
                Sample("1", "Say hi", "hi"),
                Sample("2", "Say bye", "bye"),
            ],
        ),
        (
            [
                {"id": "q1", "question": "2+2?", "answer": "4"},
                {"id": 7, "question": "1+1?", "answer": "2"},
            ],
            [Sample("q1", "2+2?", "4"), Sample("7", "1+1?", "2")],
        ),
        ([{"prompt": "P", "response": "R"}], [Sample("0", "P", "R")]),
        (
            [
                {
                    "messages": [
                        {"role": "user", "content": "U"},
                        {"role": "assistant", "content": "A"},
                    ]
                },
                {
                    "messages": [
                        {"role": "system", "content": "S"},
                        {"role": "user", "content": "U"},
                        {"role": "assistant", "content": "A"},
                    ]
                },
            ],
            [Sample("0", "U", "A"), Sample("1", "system: S\nuser: U", "A")],
        ),
    ],
    ids=["alpaca", "question-answer", "prompt-response", "chat"],
)
@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_schemas(tmp_path, rows, expected, suffix):
    path = tmp_path / f"data{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    else:
        _jsonl(path, rows)
    assert load_samples(path) == expected
    assert [record for _, record in load_records(path)] == rows


def test_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n\n  \n{"prompt": "c", "response": "d"}\n')
    assert [s.response for s in load_samples(path)] == ["b", "d"]


def _error(path: Path | str) -> str:
    with pytest.raises(FedqcError) as info:
        load_samples(path)
    return str(info.value)


def test_malformed_json_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "d"}\n'
        '{"prompt": "e", "response": \n'
    )
    assert re.match(re.escape(f"{path}:3: malformed JSON"), _error(path))


def test_malformed_json_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(
        '[\n  {"prompt": "a", "response": "b"},\n  {"prompt": "c" "response": "d"}\n]\n'
    )
    assert _error(path).startswith(f"{path}:3: malformed JSON")


@pytest.mark.parametrize("name,text", [("d.jsonl", ""), ("d.jsonl", "\n  \n"), ("d.json", "[]")])
def test_empty_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    assert _error(path) == f"{path}: holds no samples"


def test_not_utf8(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "caf\xe9", "response": "b"}\n')
    message = _error(path)
    assert message.startswith(f"{path}: not UTF-8") and "byte 15" in message


def test_missing_file(tmp_path):
    assert _error(tmp_path / "nope.jsonl") == f"{tmp_path / 'nope.jsonl'}: file not found"


@pytest.mark.parametrize(
    "rows,line,fragment",
    [
        ([{"prompt": "a", "response": "b"}, {"prompt": "a", "answer": "b"}], 2, "missing fields"),
        (
            [{"question": "a", "answer": "b"}, {"prompt": "a", "response": "b"}],
            2,
            "uses the 'prompt-response' schema but line 1 uses 'qa'",
        ),
        (
            [
                {"id": "x", "prompt": "a", "response": "b"},
                {"prompt": "c", "response": "d"},
                {"id": "x", "prompt": "e", "response": "f"},
            ],
            3,
            "duplicate id 'x' (first on line 1)",
        ),
        (
            [{"prompt": "a", "response": "b"}, {"prompt": "a", "response": "  "}],
            2,
            "response is empty",
        ),
        ([{"prompt": "a", "response": 3}], 1, "must be a string"),
        ([[1, 2]], 1, "must be a JSON object"),
        (
            [{"messages": [{"role": "user", "content": "U"}, {"role": "user", "content": "A"}]}],
            1,
            "ending with an assistant turn",
        ),
        (
            [{"messages": [{"role": "assistant", "content": "A"}]}],
            1,
            "ending with an assistant turn",
        ),
        ([{"messages": "hi"}], 1, "ending with an assistant turn"),
    ],
)
def test_record_errors_name_file_and_line(tmp_path, rows, line, fragment):
    path = _jsonl(tmp_path / "d.jsonl", rows)
    message = _error(path)
    assert message.startswith(f"{path}:{line}: ")
    assert fragment in message


# Tables through Hugging Face datasets: CSV, Parquet, a save_to_disk folder and the Hub.

TABLE = [
    {"id": "a", "instruction": "Sum", "input": "2 and 3", "output": "5"},
    {"id": "b", "instruction": "Say hi", "output": "NA"},  # no input: an empty cell, a null
]
TABLE_SAMPLES = [Sample("a", "Sum\n\n2 and 3", "5"), Sample("b", "Say hi", "NA")]


def _table(path: Path, rows: list[dict]) -> Path:
    """Write rows as a CSV or Parquet file, or (no suffix) a save_to_disk folder."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    table = datasets.Dataset.from_list([{c: r.get(c) for c in columns} for r in rows])
    if path.suffix == ".csv":
        table.to_csv(str(path), index=False)
    elif path.suffix == ".parquet":
        table.to_parquet(str(path))
    else:
        table.save_to_disk(str(path))
    return path


@pytest.mark.parametrize("name", ["data.csv", "data.parquet", "saved"])
def test_tables(tmp_path, name):
    path = _table(tmp_path / name, TABLE)
    assert load_samples(path) == TABLE_SAMPLES  # CSV: "5" and "NA" stay text
    assert [record for _, record in load_records(path)] == TABLE


def test_chat_messages_in_parquet(tmp_path):
    chat = [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]
    path = _table(tmp_path / "chat.parquet", [{"id": "c", "messages": chat}])
    assert load_samples(path) == [Sample("c", "U", "A")]


def test_a_save_to_disk_dataset_dict_with_one_split_or_a_named_split(tmp_path):
    splits = {"train": datasets.Dataset.from_list(TABLE)}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "one"))
    assert load_samples(tmp_path / "one") == TABLE_SAMPLES
    splits["test"] = splits["train"]
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "two"))
    assert _error(tmp_path / "two") == (
        f"{tmp_path / 'two'}: holds the splits train, test; name one: {tmp_path / 'two' / 'train'}"
    )
    assert load_samples(tmp_path / "two" / "test") == TABLE_SAMPLES


def test_a_missing_field_names_the_csv_row(tmp_path):
    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(1, 9)]
    rows[6]["response"] = ""  # row 7: an empty cell
    path = _table(tmp_path / "d.csv", rows)
    assert _error(path) == (
        f"{path} (row 7): missing fields; need 'instruction'+'output', 'question'+'answer', "
        "'prompt'+'response' or 'messages' (found prompt)"
    )


def test_a_duplicate_id_names_both_parquet_rows(tmp_path):
    path = _table(tmp_path / "d.parquet", [TABLE[0], TABLE[1], TABLE[0]])
    assert _error(path) == f"{path} (row 3): duplicate id 'a' (first on row 1)"


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("d.parquet", b"PAR1 not parquet", ": not a readable Parquet file (ArrowInvalid: "),
        ("d.csv", b'prompt,response\n"p,r\n', ": not a readable CSV file (ParserError: "),
        ("d.txt", b"prompt: p", ": unknown file type '.txt'; use a .jsonl, .json, .csv or "),
        ("d.csv", b"", ": not a readable CSV file"),
    ],
    ids=["corrupt-parquet", "corrupt-csv", "unknown-suffix", "empty-csv"],
)
def test_unreadable_files_are_one_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    error = _error(path)
    assert error.startswith(f"{path}{message}") and "\n" not in error


def test_a_folder_not_written_by_save_to_disk(tmp_path):
    assert _error(tmp_path).startswith(f"{tmp_path}: a folder, but not one written by datasets'")


def test_a_hub_dataset_with_its_config_and_split(monkeypatch):
    calls = []

    def load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(TABLE)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert load_samples("hub:owner/name/main:test") == TABLE_SAMPLES
    assert load_samples("hub:owner/name") == TABLE_SAMPLES
    assert calls == [("owner/name", "main", "test"), ("owner/name", None, "train")]
    assert _error("hub:name").startswith("hub:name: a hub dataset is hub:OWNER/NAME[/CONFIG]")


def test_the_hub_offline_is_one_line(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'owner/name' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    assert _error("hub:owner/name") == (
        "hub:owner/name: cannot load it from the Hugging Face Hub (ConnectionError: Couldn't "
        "reach 'owner/name' on the Hub (LocalEntryNotFoundError)); check the id, config and "
        "split, and the internet connection (or use a save_to_disk folder)"
    )


def test_a_source_exists_as_a_file_a_folder_or_a_hub_id(tmp_path):
    _table(tmp_path / "saved", TABLE)
    assert source_exists(tmp_path / "saved") and source_exists("hub:owner/name")
    assert not source_exists(tmp_path / "nope.parquet")


def test_client_data_in_any_format_but_one_per_client(tmp_path):
    _jsonl(tmp_path / "client-0.jsonl", [{"prompt": "p", "response": "r"}])
    _table(tmp_path / "client-1.parquet", TABLE)
    _table(tmp_path / "client-2", TABLE)
    assert [client_source(tmp_path, i) for i in range(4)] == [
        tmp_path / "client-0.jsonl",
        tmp_path / "client-1.parquet",
        tmp_path / "client-2",
        None,
    ]
    _table(tmp_path / "client-1.csv", TABLE)
    with pytest.raises(FedqcError, match="client 1 has client-1.csv, client-1.parquet; keep one"):
        client_source(tmp_path, 1)
