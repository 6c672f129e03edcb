"""Base of model-level PEFT methods (those outside the mixers)."""
import torch.nn as nn


class ModelAdapter(nn.Module):
    mergeable = True

    def adapt_embed(self, inputs, emb):       # token ids (LM) or images (Vim) -> embeddings
        return emb

    def adapt_param(self, name, tensor):      # Vim's "cls_token" and "pos_embed"
        return tensor

    def prompt(self):                         # (n, D) tokens put in the residual stream, or None
        return None
