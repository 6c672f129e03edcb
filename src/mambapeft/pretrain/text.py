"""`mambapeft pretrain lm`: a byte-level BPE tokenizer and a Mamba-1 language model from scratch on
CORPUS/text.jsonl (or text.jsonl.gz), {"text", "source"} per line.

Documents are shuffled (seeded) and a slice of them held out for validation; each split is encoded,
an EOS appended to every document, and the token stream cut into rows of seq_len tokens (the last
partial row dropped). The loss is next-token cross entropy over every position of a row."""
import gzip
import json
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..cli import UsageError
from ..models import MambaConfig, MambaForCausalLM
from . import run
from .tokenizer import EOS, train_tokenizer

# d_model 256, 4 layers, vocab 3072: 2.55M parameters, 10.2 MB in fp32 (the embedding tied to the
# head is 0.79M of them). Width and depth go to the blocks rather than to a larger vocabulary: at
# 3072 tokens a corpus word is about 1.3 tokens already.
SHAPE = {"vocab_size": 3072, "hidden_size": 256, "num_hidden_layers": 4, "state_size": 16}
DEFAULTS = {"steps": 4000, "batch_size": 64, "lr": 2e-3, "seq_len": 256, "warmup": 200, "eval_every": 250,
            "weight_decay": 0.1, "validation": 0.01}


def read_texts(corpus_dir):
    """The documents' texts, from text.jsonl or text.jsonl.gz; one line naming file:line and field
    for anything else."""
    corpus_dir = Path(corpus_dir)
    if not corpus_dir.is_dir():
        raise UsageError(f"{corpus_dir}: no such corpus folder (expected the corpus/ that build-corpora writes)")
    path = next((corpus_dir / n for n in ("text.jsonl", "text.jsonl.gz") if (corpus_dir / n).is_file()), None)
    if path is None:
        raise UsageError(f"{corpus_dir}: no text.jsonl or text.jsonl.gz (mambapeft build-corpora writes it)")
    texts = []
    try:
        with (gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UsageError(f"{path}:{n}: not a JSON object ({e.msg})") from None
                if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
                    raise UsageError(f"{path}:{n}: field 'text': expected a string in a JSON object")
                if doc["text"]:
                    texts.append(doc["text"])
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot read it ({e})") from None
    if not texts:
        raise UsageError(f"{path}: holds no documents")
    return path, texts


def pack(tokenizer, texts, seq_len):
    """(rows, seq_len) int64: the documents' tokens, each followed by EOS, end to end; and the token count."""
    eos = tokenizer.convert_tokens_to_ids(EOS)
    stream = []
    for enc in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        stream += enc.ids
        stream.append(eos)
    rows = len(stream) // seq_len
    return torch.tensor(stream[:rows * seq_len], dtype=torch.long).view(rows, seq_len), len(stream)


class TextTask:
    """The engine's contract (training/task.py) for packed rows: the loss summed over the predicted
    tokens, validation loss and perplexity on the held-out rows."""
    metric, greater_is_better, unit = "loss", False, "tokens"

    def __init__(self, train_rows, validation_rows, config: MambaConfig, eval_batch_size=64):
        self.rows = {"train": train_rows, "validation": validation_rows}
        self.config, self.eval_batch_size = config, eval_batch_size

    def load_model(self, model_section):
        return MambaForCausalLM(self.config)

    def train_set(self):
        return self.rows["train"]

    def collate(self, items):
        return {"input_ids": torch.stack(items)}

    def loss(self, model, batch):
        ids = batch["input_ids"]
        count = ids.shape[0] * (ids.shape[1] - 1)   # every position but the last predicts the next token
        return model(ids, labels=ids).loss.float() * count, count

    def evaluate(self, model, split):
        rows = self.rows.get(split)
        if rows is None or split == "train" or len(rows) == 0:
            raise KeyError(split)
        device = next(model.parameters()).device
        total, count = 0.0, 0
        for i in range(0, len(rows), self.eval_batch_size):
            s, c = self.loss(model, {"input_ids": rows[i:i + self.eval_batch_size].to(device)})
            total += float(s)
            count += c
        return {"loss": total / count, "perplexity": math.exp(min(total / count, 50.0))}


def pretrain(corpus_dir, out_dir, steps=DEFAULTS["steps"], batch_size=DEFAULTS["batch_size"], lr=DEFAULTS["lr"],
             seq_len=DEFAULTS["seq_len"], seed=0, warmup=DEFAULTS["warmup"], eval_every=DEFAULTS["eval_every"],
             weight_decay=DEFAULTS["weight_decay"], validation=DEFAULTS["validation"], device="auto", **shape):
    """Train the tokenizer and the model; write OUT_DIR (see the module docstring). Returns pretrain.json."""
    out = run.check_out_dir(out_dir)
    shape = {**SHAPE, **{k: v for k, v in shape.items() if v is not None}}
    start = time.perf_counter()
    path, texts = read_texts(corpus_dir)
    random.Random(seed).shuffle(texts)
    n_val = max(1, round(validation * len(texts)))
    if len(texts) < 2 * n_val:
        raise UsageError(f"{path}: {len(texts)} documents are too few to hold out {n_val} for validation")
    val_texts, train_texts = texts[:n_val], texts[n_val:]
    tokenizer = train_tokenizer(train_texts, shape["vocab_size"])
    train_rows, train_tokens = pack(tokenizer, train_texts, seq_len)
    val_rows, val_tokens = pack(tokenizer, val_texts, seq_len)
    if len(val_rows) == 0 or len(train_rows) < batch_size:
        raise UsageError(f"{path}: {train_tokens} training and {val_tokens} validation tokens make {len(train_rows)} "
                         f"and {len(val_rows)} rows of {seq_len}; need --batch-size {batch_size} training rows and "
                         "one validation row (lower --seq-len or --batch-size)")
    eos = tokenizer.convert_tokens_to_ids(EOS)
    # the vocabulary may come out smaller than asked on a small corpus: the model takes its real size
    config = MambaConfig(**{**shape, "vocab_size": len(tokenizer)}, pad_token_id=eos, bos_token_id=eos,
                         eos_token_id=eos)
    prepare_s = time.perf_counter() - start
    torch.manual_seed(seed)
    model = MambaForCausalLM(config)
    task = TextTask(train_rows, val_rows, config)
    cfg = run.engine_config(out, {"from_scratch": asdict(config)},
                            {"type": "pretrain-lm", "corpus": str(path), "seq_len": seq_len, "validation": validation},
                            steps, batch_size, lr, seed, warmup, eval_every, weight_decay, device)
    result, train_s, step_s = run.train(cfg, task, model)
    model.cpu().save_pretrained(out)
    tokenizer.save_pretrained(out)
    best = result["best_validation"]
    summary = {
        "model": "MambaForCausalLM", "parameters": sum(p.numel() for p in model.parameters()),
        "weights_bytes": (out / "model.safetensors").stat().st_size, "config": asdict(config),
        "corpus": {"file": str(path), "documents": len(texts), "train_documents": len(train_texts),
                   "validation_documents": len(val_texts), "train_tokens": train_tokens,
                   "validation_tokens": val_tokens, "seq_len": seq_len, "train_rows": len(train_rows),
                   "validation_rows": len(val_rows)},
        "tokenizer": {"type": "byte-level BPE", "vocab_size": len(tokenizer), "eos": EOS,
                      "bytes_per_token": round(sum(len(t.encode()) for t in train_texts) / max(1, train_tokens), 3)},
        "training": {**cfg["training"], "epochs": round(steps * batch_size / len(train_rows), 2),
                     "tokens_seen": steps * batch_size * seq_len},
        "result": {"steps": result["steps"], "best_step": result["best_step"],
                   "validation_loss": best["loss"], "validation_perplexity": best["perplexity"]},
        "seconds": {"prepare": round(prepare_s, 1), "train": round(train_s, 1),
                    "median_step": round(step_s, 4) if step_s else None},
        "device": run.device_name(cfg["training"]["device"]), "torch": torch.__version__}
    run.write_summary(out, summary)
    return summary

