"""Instruction samples and their loading in the usual schemas.

Schemas (one per source): ``instruction``/``input``/``output`` (Alpaca), ``question``/``answer``
(GSM8K), ``prompt``/``response``, and chat ``messages`` ending with an assistant turn; any schema
may add a ``domain`` string (an anchor's domain, for the per-domain standard). Sources:
JSON/JSONL, CSV and Parquet files, a ``save_to_disk`` folder or a Hub dataset
(:mod:`fedqc.data.sources`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedqc.data.sources import json_rows, read_rows, read_text
from fedqc.errors import FedqcError

SCHEMAS = {
    "alpaca": ("instruction", "output"),
    "qa": ("question", "answer"),
    "prompt-response": ("prompt", "response"),
    "chat": ("messages",),
}
_SCHEMA_HELP = "'instruction'+'output', 'question'+'answer', 'prompt'+'response' or 'messages'"


@dataclass(frozen=True)
class Sample:
    id: str
    prompt: str
    response: str
    domain: str | None = None  # an anchor's optional domain label (the row's ``domain`` field)


def load_samples(path: str | Path) -> list[Sample]:
    """Read samples from a source (:mod:`fedqc.data.sources`); a problem names the source and
    the line or row."""
    return [sample for sample, _ in load_records(path)]


def load_records(path: str | Path) -> list[tuple[Sample, dict]]:
    """Each sample with the row it came from (to write kept samples back unchanged)."""
    records = read_rows(path)
    if not records:
        raise FedqcError(f"{path}: holds no samples")
    samples, schema0, seen = [], None, {}
    for where, label, record in records:
        if not isinstance(record, dict):
            raise FedqcError(f"{where}: each sample must be a JSON object")
        schema = _schema_of(record, where)
        if schema0 is None:
            schema0 = (schema, label)
        elif schema != schema0[0]:
            raise FedqcError(
                f"{where}: uses the '{schema}' schema but {schema0[1]} uses "
                f"'{schema0[0]}'; use one schema per file"
            )
        sample = _to_sample(record, schema, default_id=str(len(samples)), where=where)
        if sample.id in seen:
            raise FedqcError(f"{where}: duplicate id '{sample.id}' (first on {seen[sample.id]})")
        seen[sample.id] = label
        samples.append((sample, record))
    return samples


def read_scores(path: str | Path) -> tuple[list[str], list[float], str]:
    """(ids, raw scores, scorer name) from a `fedqc score` output file."""
    ids, values, scorers = [], [], set()
    path = Path(path)
    if not path.is_file():
        raise FedqcError(f"{path}: file not found")
    for where, _, record in json_rows(path, read_text(path)):
        if not isinstance(record, dict) or not {"id", "score", "scorer"} <= record.keys():
            raise FedqcError(f"{where}: need 'id', 'score' and 'scorer' (from fedqc score)")
        ids.append(str(record["id"]))
        values.append(float("nan") if record["score"] is None else float(record["score"]))
        scorers.add(record["scorer"])
    if len(scorers) != 1:
        raise FedqcError(f"{path}: needs exactly one scorer, found {sorted(scorers) or 'none'}")
    return ids, values, scorers.pop()


def _schema_of(record: dict, where: str) -> str:
    for name, keys in SCHEMAS.items():
        if all(k in record for k in keys):
            return name
    found = ", ".join(sorted(record)) or "no fields"
    raise FedqcError(f"{where}: missing fields; need {_SCHEMA_HELP} (found {found})")


def _to_sample(record: dict, schema: str, default_id: str, where: str) -> Sample:
    sid = str(record.get("id", default_id))
    if schema == "chat":
        prompt, response = _from_messages(record["messages"], where)
    else:
        prompt_key, response_key = SCHEMAS[schema]
        prompt, response = record[prompt_key], record[response_key]
        if schema == "alpaca" and record.get("input"):
            prompt = f"{prompt}\n\n{record['input']}"
    for name, value in (("prompt", prompt), ("response", response)):
        if not isinstance(value, str):
            raise FedqcError(f"{where}: the {name} must be a string")
    if not response.strip():
        raise FedqcError(f"{where}: the response is empty")
    domain = record.get("domain")
    if domain is not None and not isinstance(domain, str):
        raise FedqcError(f"{where}: the domain must be a string")
    return Sample(sid, prompt, response, domain.strip() or None if domain else None)


def _from_messages(messages: Any, where: str) -> tuple[str, str]:
    ok = (
        isinstance(messages, list)
        and len(messages) >= 2
        and all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)
    )
    if not ok or messages[-1]["role"] != "assistant":
        raise FedqcError(
            f"{where}: 'messages' must be a list of {{role, content}} ending with an assistant turn"
        )
    turns = messages[:-1]
    if len(turns) == 1:
        return turns[0]["content"], messages[-1]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in turns), messages[-1]["content"]
