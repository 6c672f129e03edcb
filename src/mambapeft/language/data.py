"""Instruction data in the commonsense_170k format: a JSON list or JSON lines of records
{"instruction", "input", "output", "answer"?}, put in the Alpaca template, tokenized with a cutoff,
EOS appended, split into train and a seeded held-out validation set, and padded into batches."""
import json
import logging
import random
from pathlib import Path

import torch

from ..peft.config import ConfigError

log = logging.getLogger(__name__)

# The Alpaca template, as LLM-Adapters' finetune.py uses it for commonsense_170k.
PROMPT_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
TEMPLATES = ("alpaca", "none")   # "none": instruction, input and output joined as they are (for tiny tests)
FIELDS = {"instruction": True, "input": False, "output": True, "answer": False}   # name -> required


class DataError(ConfigError):
    """A data file that cannot be used: the message names the file, the record and the field."""


def read_records(path):
    """The records of a JSON list or JSON lines file, each checked for the instruction fields."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found" if not path.exists() else f"{path}: expected a file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")   # a BOM from a Windows editor is not an error
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (byte {e.start}); save the file as UTF-8") from None
    if not text.strip():
        raise DataError(f"{path}: empty file; expected a JSON list or JSON lines of instruction records")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg})") from None
        where = [f"record {i}" for i in range(len(records))]
    else:
        records, where = [], []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {n}: invalid JSON ({e.msg}); expected one JSON object per line, "
                                "or a JSON list") from None
            where.append(f"line {n} (record {len(records) - 1})")
    if not records:
        raise DataError(f"{path}: no records; expected a JSON list or JSON lines of instruction records")
    for rec, at in zip(records, where):
        check_record(rec, f"{path}: {at}")
    return records


def check_record(rec, at):
    if not isinstance(rec, dict):
        raise DataError(f"{at}: expected an object with {', '.join(FIELDS)}, got {type(rec).__name__}")
    for name, required in FIELDS.items():
        if name not in rec or rec[name] is None:
            if required:
                raise DataError(f"{at}: field {name!r}: missing (expected a string)")
        elif not isinstance(rec[name], str):
            raise DataError(f"{at}: field {name!r}: expected a string, got {type(rec[name]).__name__}")


def prompt(rec, template="alpaca"):
    """The text before the response."""
    if template == "none":
        return rec["instruction"] + (rec.get("input") or "")
    if rec.get("input"):
        return PROMPT_WITH_INPUT.format(instruction=rec["instruction"], input=rec["input"])
    return PROMPT_NO_INPUT.format(instruction=rec["instruction"])


def tokenize(records, tokenizer, template="alpaca", cutoff=256, train_on_inputs=False, overlong="truncate",
             source="data"):
    """Items (input_ids, labels) as lists of ints. A sequence longer than `cutoff` is cut to `cutoff`
    tokens without EOS (as LLM-Adapters does) or dropped (overlong: drop); one whose prompt alone
    fills the cutoff has no response token to learn from and is dropped when train_on_inputs is off."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError(f"{source}: the tokenizer has no eos_token; set one in its tokenizer_config.json")
    prompts = [prompt(r, template) for r in records]
    full = tokenizer([p + r["output"] for p, r in zip(prompts, records)])["input_ids"]
    heads = tokenizer(prompts)["input_ids"]
    items, cut, dropped, no_response = [], 0, 0, 0
    for ids, head in zip(full, heads):
        ids = list(ids)
        if len(ids) > cutoff:
            if overlong == "drop":
                dropped += 1
                continue
            cut += 1
            ids = ids[:cutoff]
        elif len(ids) < cutoff and ids[-1:] != [eos]:
            ids.append(eos)
        n_prompt = 0 if train_on_inputs else min(len(head), len(ids))
        if max(n_prompt, 1) >= len(ids):   # position 0 predicts nothing: a label must sit after it
            no_response += 1
            continue
        items.append((ids, [-100] * n_prompt + ids[n_prompt:]))
    if cut:
        log.warning("%s: %d of %d records are longer than the cutoff of %d tokens and were cut to it (no EOS)",
                    source, cut, len(records), cutoff)
    if dropped:
        log.warning("%s: dropped %d of %d records longer than the cutoff of %d tokens (overlong: drop)",
                    source, dropped, len(records), cutoff)
    if no_response:
        log.warning("%s: dropped %d of %d records whose prompt alone fills the cutoff of %d tokens, leaving no "
                    "response token to learn", source, no_response, len(records), cutoff)
    if not items:
        raise DataError(f"{source}: no usable record is left after the cutoff of {cutoff} tokens; raise cutoff")
    return items


def split(items, validation_size, seed=42):
    """(train, validation): a seeded random `validation_size` items held out, the rest in file order."""
    if not 0 <= validation_size < len(items):
        raise ConfigError(f"validation_size: expected 0 <= n < {len(items)} (the number of usable records), "
                          f"got {validation_size}")
    held = set(random.Random(seed).sample(range(len(items)), validation_size))
    return ([x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held])


def collate(items, pad_id, multiple=1):
    """Right-padded input_ids, the attention mask (1 on real tokens) and labels (-100 on padding and,
    unless train_on_inputs, the prompt), the length rounded up to a multiple of `multiple`. The model
    zeroes padded positions before the scan, and with right padding no real token comes after one."""
    T = -(-max(len(ids) for ids, _ in items) // multiple) * multiple
    out = {"input_ids": torch.full((len(items), T), pad_id, dtype=torch.long),
           "attention_mask": torch.zeros((len(items), T), dtype=torch.long),
           "labels": torch.full((len(items), T), -100, dtype=torch.long)}
    for i, (ids, labels) in enumerate(items):
        out["input_ids"][i, :len(ids)] = torch.tensor(ids)
        out["attention_mask"][i, :len(ids)] = 1
        out["labels"][i, :len(ids)] = torch.tensor(labels)
    return out
