"""Pretraining from scratch of the default's two small base models, on the corpora that
`mambapeft build-corpora` writes, with the project's engine (training/trainer.py, method `full`):

    text.py       a Mamba-1 language model and its byte-level BPE tokenizer (tokenizer.py)
    images.py     a Vision Mamba classifier on the labelled image corpus
    run.py        what both share: the engine's config, the output folder, pretrain.json
"""
