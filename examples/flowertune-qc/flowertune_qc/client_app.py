"""The ClientApp: local LoRA training on this node's data (only the rows it kept)."""

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedqc.flower import answer_quality_query, kept  # fedqc
from flowertune_qc.config import app_config
from flowertune_qc.dataset import load_data, to_text
from flowertune_qc.models import get_model, get_weights, set_weights, train

app = ClientApp()


@app.query("quality")  # fedqc: score this node's data with the server's plan, reply counts
def quality(msg: Message, context: Context) -> Message:  # fedqc
    trainset = load_data(int(context.node_config["partition-id"]), app_config(context))  # fedqc
    return answer_quality_query(msg, context, trainset)  # fedqc


@app.train()
def train_(msg: Message, context: Context) -> Message:
    cfg = app_config(context)
    trainset = load_data(int(context.node_config["partition-id"]), cfg)
    trainset = kept(context, trainset)  # fedqc: the rows that passed quality control
    model, tokenizer = get_model(cfg["model"])
    set_weights(model, msg.content["arrays"].to_torch_state_dict())
    if len(trainset) == 0:  # fedqc: a node that kept nothing sends its weights back, weight 0
        return reply(msg, model, float("nan"), 0)  # fedqc
    texts = [to_text(row, tokenizer.eos_token) for row in trainset]
    seed = int(msg.content["config"]["server-round"])
    loss = train(model, tokenizer, texts, cfg["train"], cfg["model"]["max-length"], seed)
    return reply(msg, model, loss, len(trainset))


def reply(msg: Message, model, loss: float, num_examples: int) -> Message:
    """The adapter and the metrics FedAvg weighs it by."""
    metrics = MetricRecord({"train_loss": loss, "num-examples": num_examples})
    content = RecordDict({"arrays": ArrayRecord(get_weights(model)), "metrics": metrics})
    return Message(content, reply_to=msg)
