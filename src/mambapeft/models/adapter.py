"""Base of model-level PEFT methods (those outside the mixers), and what the model layer needs to
know about attached adapters in general (never which methods they are)."""
import torch.nn as nn


class ModelAdapter(nn.Module):
    mergeable = True
    active = True   # False while another adapter is selected or adapters are disabled

    def adapt_embed(self, inputs, emb):       # token ids (LM) or images (Vim) -> embeddings
        return emb

    def adapt_param(self, name, tensor):      # Vim's "cls_token" and "pos_embed"
        return tensor

    def prompt(self):                         # (n, D) tokens put in the residual stream, or None
        return None

    def merge_into(self, model):              # mergeable methods: fold the delta into model's weights
        raise NotImplementedError(f"{type(self).__name__} cannot be merged")


def active(adapters: nn.ModuleDict):
    """The adapters of a `peft` ModuleDict that take part in the forward."""
    return [a for a in adapters.values() if a.active]


def peft_dicts(model):
    """Every `peft` ModuleDict of a model (backbone and mixers)."""
    return [m.peft for m in model.modules() if isinstance(getattr(m, "peft", None), nn.ModuleDict)]


def attached_methods(model):
    """Names of the methods attached to `model` (a module's `method` stamp, else its key)."""
    return sorted({getattr(a, "method", k) for d in peft_dicts(model) for k, a in d.items()})


def refuse_attached(model, directory):
    """Saving base weights with adapters still attached would silently drop them."""
    left = attached_methods(model)
    if left:
        raise ValueError(f"{directory}: the model still carries PEFT modules ({', '.join(left)}) that its "
                         "base weights cannot hold; save them with PeftModel.save_pretrained, merge them "
                         "(merge_and_unload) or remove them (unload) first")
