"""The nodes' data: one JSONL file per partition (GSM8K's question/answer rows), and the server's
trusted anchors."""

from pathlib import Path

from datasets import Dataset

DEMO = Path.home() / ".cache" / "flowertune-qc" / "demo"


def data_dir(cfg: dict) -> Path:
    """``dataset.path``, or fedqc's GSM8K demo federation (written once)."""
    if cfg["dataset"]["path"]:
        return Path(cfg["dataset"]["path"])
    if not (DEMO / "anchors.jsonl").is_file():
        from fedqc.data.demo import write_demo

        write_demo(DEMO, 4, 75, 10, 40, "0.1,0.3,0.5,0.7", seed=0)
    return DEMO


def load_data(partition_id: int, cfg: dict) -> Dataset:
    """This node's training rows."""
    return Dataset.from_json(str(data_dir(cfg) / "clients" / f"client-{partition_id}.jsonl"))


def load_anchors(cfg: dict) -> Dataset:  # fedqc: the server's trusted samples
    return Dataset.from_json(str(data_dir(cfg) / "anchors.jsonl"))  # fedqc


def to_text(row: dict, eos: str) -> str:
    """One training sequence: the question, then the answer the model learns to give."""
    return f"Question: {row['question']}\nAnswer: {row['answer']}{eos}"
