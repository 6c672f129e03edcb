"""Train the small character-level Mamba shipped in src/mambapeft/assets/tiny-mamba.

It learns two-digit additions ("12+7=19") in about a minute on two CPU cores, so that
`mambapeft generate` has a model to run on a machine without network. Rerun to rebuild it:
    python examples/make_tiny_model.py
"""
import random
import sys
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from tqdm import trange
from transformers import PreTrainedTokenizerFast

from mambapeft.models import MambaConfig, MambaForCausalLM

OUT = Path(__file__).resolve().parents[1] / "src" / "mambapeft" / "assets" / "tiny-mamba"
CHARS = ["<|endoftext|>", *"0123456789+=\n "]


def make_tokenizer():
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(CHARS)}, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def example(rng):
    a, b = rng.randrange(100), rng.randrange(100)
    return f"{a}+{b}={a + b}"


def main(steps=int(sys.argv[1]) if len(sys.argv) > 1 else 1500):
    rng = random.Random(0)
    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    config = MambaConfig(vocab_size=len(CHARS), hidden_size=64, num_hidden_layers=2, state_size=16,
                         pad_token_id=0, bos_token_id=0, eos_token_id=0)
    model = MambaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    eos = tokenizer.eos_token_id
    for step in (bar := trange(steps, desc="training tiny-mamba")):
        rows = [tokenizer(example(rng))["input_ids"] + [eos] for _ in range(64)]
        T = max(map(len, rows))
        ids = torch.tensor([r + [eos] * (T - len(r)) for r in rows])
        labels = torch.tensor([r + [-100] * (T - len(r)) for r in rows])
        loss = model(ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.save_pretrained(OUT)
    tokenizer.save_pretrained(OUT)
    model.eval()
    right = 0
    for _ in range(100):
        a, b = rng.randrange(100), rng.randrange(100)
        ids = torch.tensor([tokenizer(f"{a}+{b}=")["input_ids"]])
        out = tokenizer.decode(model.generate(ids, max_new_tokens=4, eos_token_id=eos)[0, ids.shape[1]:],
                               skip_special_tokens=True)
        right += out == str(a + b)
    print(f"saved to {OUT}; exact sums on 100 new additions: {right}/100")


if __name__ == "__main__":
    main()
