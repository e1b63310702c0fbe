"""Loading samples from JSON / JSONL in every schema, and the errors a user can hit."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fedqc.data.samples import Sample, load_records, load_samples
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


def _error(path: Path) -> str:
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
