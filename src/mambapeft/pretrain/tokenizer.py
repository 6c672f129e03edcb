"""A byte-level BPE tokenizer trained with `tokenizers`, saved in the Hugging Face layout
(tokenizer.json + tokenizer_config.json) that transformers.AutoTokenizer and
models.checkpoint.load_tokenizer read."""
EOS = "<|endoftext|>"   # end of document, also the padding token (as GPT-2 and the Mamba models)


def train_tokenizer(texts, vocab_size, min_frequency=2):
    """A PreTrainedTokenizerFast over `texts` (an iterable of str). Id 0 is EOS; every byte has a
    token, so any text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, bos_token=EOS,
                                   model_max_length=10 ** 9)
