"""Recording inside trainers: the Hugging Face `Trainer` (a 2-layer BERT
built from a configuration, random weights, nothing downloaded) and
PyTorch Lightning, through reptrace.integrations. Each run is checked as
the plain loops are: verify's completeness checks pass, the traced layers'
final weights are rebuilt from the records, and `top_proponents` answers
for a probe."""
import glob

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import reptrace
from kit import (
    CLASSES,
    MLP,
    assert_reconstructs,
    completeness,
    manifest,
    start_weights,
    table,
    token_ids,
)

transformers = pytest.importorskip("transformers")
lightning = pytest.importorskip("lightning")

SEQ, VOCAB = 12, 40


class Tokens(torch.utils.data.Dataset):
    """A synthetic sequence task: label 1 when token 1 occurs more often
    than token 2; each item carries its index as `reptrace_id`."""

    def __init__(self, n, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(1, 6, (n, SEQ), generator=g)
        self.x[:, 0] = 0  # a [CLS]-like first token
        self.y = ((self.x == 1).sum(1) > (self.x == 2).sum(1)).long()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.y[i], "reptrace_id": i}


def tiny_bert():
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=SEQ, num_labels=2,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def hf_args(tmp_path, **over):
    options = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_train_epochs=2,
        gradient_accumulation_steps=2, max_grad_norm=1.0, optim="sgd", learning_rate=0.05,
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, seed=0,
        remove_unused_columns=False, lr_scheduler_type="linear", warmup_steps=2,
    )
    options.update(over)
    return transformers.TrainingArguments(**options)


LAYERS = ["bert.pooler.dense", "classifier"]
# BERT's position embedding: its (1, T) position ids are shared by the batch.
POSITIONS = "bert.embeddings.position_embeddings"


def assert_answers(run, mode, n):
    """The canned questions answer for the run's first probe: its top
    proponents among the n training instances (instance mode), its top
    steps (batch mode: records are whole steps)."""
    r = reptrace.open(run)
    probe = r.sql("SELECT MIN(probe_id) AS p FROM probes")["p"][0].as_py()
    if mode == "instance":
        top = r.query("top_proponents", probe=probe)
        assert top.num_rows > 0
        assert set(top["instance_id"].to_pylist()) <= set(range(n))
    else:
        assert r.query("top_steps", probe=probe).num_rows > 0


# A clip of 0.1 clips every step; its larger lr keeps the update well above
# the float32 rounding of the weights it is added to.
# AdamW (the Trainer's default optimizer, and its fused variant) is
# recorded in instance mode too, with Adam's preconditioner per step; the
# Trainer's weight decay is 0 by default, so the run promises exactness.
@pytest.mark.parametrize("optim, mode, clip, lr, whole", [
    ("sgd", "instance", 1.0, 0.05, True), ("sgd", "instance", 0.1, 0.5, False),
    ("adamw_torch", "instance", 1.0, 0.01, False),
    ("adamw_torch_fused", "instance", 0.1, 0.01, False),
    ("adagrad", "batch", 1.0, 0.05, False)])
def test_hugging_face_trainer_run_is_recorded_exactly(tmp_path, optim, mode, clip, lr, whole):
    from reptrace.integrations.huggingface import ReptraceCallback

    data = Tokens(96)
    model = tiny_bert()
    initial = start_weights(model)
    run = str(tmp_path / "bert")
    probes = (data.x[:6], data.y[:6])
    # Whole: every layer of a traced kind (embeddings, layer norms, the
    # attention and MLP projections over the sequence, pooler, classifier)
    # but the position embedding.
    choice = dict(exclude=[POSITIONS]) if whole else dict(layers=LAYERS)
    callback = ReptraceCallback(run, classes=["no", "yes"], probes=probes, **choice)
    # The whole model also trains with gradient checkpointing: its layers
    # run again inside backward(), and those calls are the ones recorded.
    args = hf_args(tmp_path, optim=optim, max_grad_norm=clip, learning_rate=lr,
                   gradient_checkpointing=whole)
    trainer = transformers.Trainer(model=model, args=args,
                                   train_dataset=data, callbacks=[callback])
    trainer.train()

    m = manifest(run)
    assert m["mode"] == mode
    names = {s["name"] for s in m["model"]["modules"]}
    if whole:
        kinds = {s["kind"] for s in m["model"]["modules"]}
        assert kinds == {"embedding", "layer_norm", "linear"}, kinds
        assert POSITIONS not in names and "bert.embeddings.word_embeddings" in names
        assert len(names) == 3 + 2 * 8 + 2, names  # embeddings, 2 layers, pooler, head
    else:
        assert names == set(LAYERS)
    assert m["settings"]["trainer"] == "transformers.Trainer"
    assert m["settings"]["gradient_accumulation_steps"] == 2
    steps = table(run, "steps").to_pydict()
    # 96 examples, 8 per micro-batch, 2 micro-batches per step, 2 epochs.
    assert len(steps["step"]) == trainer.state.global_step == 12
    assert set(steps["batch_size"]) == {16}
    lrs = steps["lr"]
    assert len(set(lrs)) > 3, "the warm-up and linear decay are recorded per step"
    if mode == "instance":
        ids = table(run, "updates")["instance_id"].to_pylist()
        assert sorted(set(ids)) == list(range(96))
        scales = table(run, "layer_steps")["grad_scale"].to_pylist()
        if clip < 1.0:
            assert min(scales) < 0.999, "max_grad_norm clipped some steps"
    completeness(run)
    assert_reconstructs(run, model, initial)
    assert_answers(run, mode, 96)


def pad_to_longest(items):
    """A data collator padding each batch to its own longest sequence, with
    BERT's attention mask (dynamic padding)."""
    t = max(int(i["length"]) for i in items)
    ids = torch.zeros(len(items), t, dtype=torch.long)
    mask = torch.zeros(len(items), t, dtype=torch.long)
    for row, i in enumerate(items):
        ids[row, :i["length"]] = i["input_ids"][:i["length"]]
        mask[row, :i["length"]] = 1
    return {"input_ids": ids, "attention_mask": mask,
            "labels": torch.stack([i["labels"] for i in items]),
            "reptrace_id": torch.tensor([i["reptrace_id"] for i in items])}


def test_hugging_face_trainer_with_dynamic_padding_records_real_tokens(tmp_path):
    """Batches padded to their own longest sequence (4 to 12 tokens), with
    gradient accumulation 2 (micro-batches of different lengths in one
    step): the whole BERT but its position embedding is recorded, verify
    passes, W_T is rebuilt, and each example's word-embedding record holds
    exactly its real tokens (the padding, masked out of the attention, gets
    no gradient; token 0 is BERT's padding_idx and gets none either)."""
    from reptrace.integrations.huggingface import ReptraceCallback

    class Ragged(Tokens):
        def __init__(self, n):
            super().__init__(n)
            g = torch.Generator().manual_seed(5)
            self.lengths = torch.randint(4, SEQ + 1, (n,), generator=g)

        def __getitem__(self, i):
            return {**super().__getitem__(i), "length": int(self.lengths[i])}

    data = Ragged(96)
    model = tiny_bert()
    initial = start_weights(model)
    run = str(tmp_path / "bert")
    # Probes as a tokenizer's batch: padded to 12, with the attention mask
    # the model takes and the tracer leaves their padding out by.
    probes = pad_to_longest([data[i] for i in range(4)])
    probes = {k: probes[k] for k in ("input_ids", "attention_mask")}
    # The tracer's options reach it through the callback.
    callback = ReptraceCallback(run, classes=["no", "yes"], exclude=[POSITIONS],
                                probes=(probes, data.y[:4], [500, 501, 502, 503]),
                                compression="none", torch_threads=None)
    trainer = transformers.Trainer(model=model, args=hf_args(tmp_path), train_dataset=data,
                                   data_collator=pad_to_longest, callbacks=[callback])
    trainer.train()
    assert callback.tracer.torch_threads is None
    codecs = {pq.ParquetFile(f).metadata.row_group(0).column(0).compression
              for f in glob.glob(f"{run}/updates/*/*.parquet")}
    assert codecs == {"UNCOMPRESSED"}, codecs
    completeness(run)
    assert_reconstructs(run, model, initial)
    specs = {s["name"]: s for s in manifest(run)["model"]["modules"]}
    words = "bert.embeddings.word_embeddings"
    assert specs[words]["ragged"] and not specs["classifier"].get("ragged")
    rows = table(run, "updates").to_pandas()
    rows = rows[rows.layer == words]
    assert len(rows) == 2 * 96
    lr = dict(zip(*table(run, "steps").select(["step", "lr"]).to_pydict().values()))
    for i, step, u in zip(rows.instance_id, rows.step, rows.u):
        real = data.x[i, :int(data.lengths[i])]
        # The warm-up's first step has lr 0: no position changes the weight.
        want = real[real != 0].tolist() if lr[step] > 0 else []
        assert token_ids(specs[words], u).tolist() == want, (i, step)
    got = table(run, "probes").to_pandas()
    got = got[got.layer == words].sort_values("probe_id")
    assert [token_ids(specs[words], a).tolist() for a in got.a] == [
        data.x[i, :int(data.lengths[i])].tolist() for i in range(4)]
    assert_answers(run, "instance", 96)


def test_hugging_face_callback_refusals_are_one_line(tmp_path):
    from reptrace.integrations.huggingface import ReptraceCallback

    data = Tokens(32)
    callback = ReptraceCallback(str(tmp_path / "a"), classes=["no", "yes"], layers=LAYERS)
    trainer = transformers.Trainer(model=tiny_bert(),
                                   args=hf_args(tmp_path, remove_unused_columns=True),
                                   train_dataset=data, callbacks=[callback])
    with pytest.raises(reptrace.InvalidInput, match="remove_unused_columns=False") as e:
        trainer.train()
    assert "\n" not in str(e.value)
    # Every layer: BERT's position ids, (1, T), are shared by the batch, and
    # its position embedding is refused at the first step, by name.
    callback = ReptraceCallback(str(tmp_path / "b"), classes=["no", "yes"])
    trainer = transformers.Trainer(model=tiny_bert(), args=hf_args(tmp_path),
                                   train_dataset=data, callbacks=[callback])
    with pytest.raises(reptrace.InvalidInput,
                       match=r"layer 'bert.embeddings.position_embeddings': input of shape "
                             r"\(1, 12\) in a forward pass of 8 examples") as e:
        trainer.train()
    assert "\n" not in str(e.value)


class DigitsModule(lightning.LightningModule):
    """The digits MLP as a LightningModule; batches are (ids, x, y)."""

    def __init__(self, optimizer="sgd"):
        super().__init__()
        torch.manual_seed(7)
        self.net = MLP()
        self.optimizer = optimizer

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        _, x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        if self.optimizer == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        elif self.optimizer == "adamw":
            opt = torch.optim.AdamW(self.parameters(), lr=1e-3)
        else:
            opt = torch.optim.RMSprop(self.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@pytest.mark.parametrize("optimizer, mode", [("sgd", "instance"), ("adamw", "instance"),
                                             ("rmsprop", "batch")])
def test_lightning_run_is_recorded_exactly(tmp_path, data, optimizer, mode):
    from reptrace.integrations.lightning import ReptraceCallback

    x, y, test_x, test_y = data
    n = 320
    ids = torch.arange(n)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(ids, x[:n], y[:n]), batch_size=32, shuffle=True,
        generator=torch.Generator().manual_seed(0))
    module = DigitsModule(optimizer)
    initial = {f"net.{k}": v for k, v in start_weights(module.net).items()}
    run = str(tmp_path / "lightning")
    callback = ReptraceCallback(run, classes=CLASSES, probes=(test_x[:5], test_y[:5]))
    trainer = lightning.Trainer(
        max_epochs=2, accumulate_grad_batches=2, gradient_clip_val=0.05, callbacks=[callback],
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, loader)

    m = manifest(run)
    assert m["mode"] == mode
    assert [s["name"] for s in m["model"]["modules"]] == ["net.fc1", "net.fc2", "net.fc3"]
    steps = table(run, "steps").to_pydict()
    assert len(steps["step"]) == trainer.global_step == 10
    assert set(steps["batch_size"]) == {64}
    assert np.all(np.isfinite(steps["loss"]))
    if mode == "instance":
        got = table(run, "updates")["instance_id"].to_pylist()
        assert sorted(set(got)) == list(range(n))
        scales = table(run, "layer_steps")["grad_scale"].to_pylist()
        assert min(scales) < 0.999, "gradient_clip_val=0.05 clipped some steps"
    if optimizer == "adamw":
        # AdamW's default weight decay (0.01) leaves the residual (Π d − 1)·W_0,
        # which verify reports for information; the reconstruction below checks
        # the records and that residual exactly.
        assert manifest(run)["optimizer"]["weight_decay"] == 0.01
        assert not [c for c in reptrace.open(run).verify() if c["status"] == "FAIL"]
    else:
        completeness(run)
    assert_reconstructs(run, module, initial)
    assert_answers(run, mode, n)
