"""One loaded base model per task, re-wrapped for every trial: the adapters of a trial are removed
afterwards and the weights restored from a copy taken at load time (full fine-tuning and merges
write into the base weights, so removing adapters alone would not be enough)."""
import torch

from ..models.norm import memory_efficient_norm
from ..peft.inject import backbone, mixers


class BaseModel:
    def __init__(self, model):
        self.model = model
        self.training = model.training
        # clone: the state dict shares storage with the live parameters the trials will train
        self.saved = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def restore(self):
        """The model exactly as loaded: no adapter attached, frozen, original weights and mode."""
        model = self.model
        for m in mixers(model):
            m.peft.clear()
        backbone(model).peft.clear()
        for k, t in model.state_dict(keep_vars=True).items():   # the trainer may store frozen weights in bf16
            if k in self.saved and t.dtype != self.saved[k].dtype:
                t.data = torch.empty_like(self.saved[k])
        missing, unexpected = model.load_state_dict(self.saved, strict=False)
        if missing or unexpected:   # anything left means an adapter lived outside the peft dicts
            raise RuntimeError(f"the base model did not come back as loaded: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
        memory_efficient_norm(model, None)   # training.memory_efficient_norm sets the norms' output dtype
        model.requires_grad_(False)
        model.train(self.training)
        model.zero_grad(set_to_none=True)
        return model
