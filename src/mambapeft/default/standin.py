"""Random stand-ins of the shipped models' shapes (assets/mamba-default, assets/vim-default), for
tests and CPU timings before the pretrained ones exist: the same files and layout, untrained weights.
Never ship one as the real model."""
import json
from pathlib import Path

EOS = "<|endoftext|>"   # as the pretrained model's byte-level BPE tokenizer
LM_SHAPE = {"hidden_size": 256, "num_hidden_layers": 4, "state_size": 16, "vocab_size": 3072}
VIM_SHAPE = {"img_size": 32, "patch_size": 4, "hidden_size": 128, "num_hidden_layers": 12}


def tokenizer(texts, vocab_size):
    """A byte-level BPE tokenizer trained on `texts`, EOS (id 0) also the padding token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, bos_token=EOS,
                                   model_max_length=10 ** 9)


def language_model(directory, seed=0, texts=None, **shape):
    """A random MambaForCausalLM with a BPE tokenizer trained on the shipped suite's training file."""
    import torch
    from ..models import MambaConfig, MambaForCausalLM
    from .shipped import LANGUAGE
    from ..language.data import prompt
    shape = {**LM_SHAPE, **shape}
    if texts is None:
        texts = [prompt(r) + r["output"] for r in json.loads((LANGUAGE / "train.json").read_text())]
    tok = tokenizer(texts, shape["vocab_size"])
    eos = tok.convert_tokens_to_ids(EOS)
    torch.manual_seed(seed)
    config = MambaConfig(**{**shape, "vocab_size": len(tok)}, pad_token_id=eos, bos_token_id=eos, eos_token_id=eos)
    model = MambaForCausalLM(config)
    model.save_pretrained(directory)
    tok.save_pretrained(str(directory))
    return Path(directory)


def vim(directory, seed=0, num_classes=10, **shape):
    """A random VisionMamba saved with save_pretrained."""
    import torch
    from ..models import VimConfig, VisionMamba
    torch.manual_seed(seed)
    VisionMamba(VimConfig(**{**VIM_SHAPE, **shape}, num_classes=num_classes)).save_pretrained(directory)
    return Path(directory)
