"""Mamba-1 causal language model with Hugging Face module and parameter names."""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.cross_entropy import linear_cross_entropy
from .adapter import active, refuse_attached
from .block import MambaBlock, prompt_tokens
from .cache import MambaCache
from .config import MambaConfig
from .norm import RMSNorm
from .tokens import insert_tokens_at, take_positions


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None
    loss: torch.Tensor | None = None
    cache: MambaCache | None = None


class MambaModel(nn.Module):
    def __init__(self, config: MambaConfig):
        super().__init__()
        self.config = config
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            MambaBlock(config.hidden_size, eps=config.layer_norm_epsilon, residual_in_fp32=config.residual_in_fp32,
                       d_state=config.state_size, expand=config.expand, d_conv=config.conv_kernel,
                       dt_rank=config.time_step_rank, bias=config.use_bias, conv_bias=config.use_conv_bias,
                       rms_eps=config.mixer_rms_eps)
            for _ in range(config.num_hidden_layers))
        self.norm_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.peft = nn.ModuleDict()

    def forward(self, input_ids, attention_mask=None, cache=None):
        h = self.embeddings(input_ids)
        for a in active(self.peft):
            h = a.adapt_embed(input_ids, h)
        mask = attention_mask
        prompt = prompt_tokens(active(self.peft)) if cache is None or cache.is_fresh else None
        if prompt is not None:
            h, mask, keep = insert_tokens_at(h, prompt, attention_mask, 1)
        for i, layer in enumerate(self.layers):
            h = layer(h, mask, cache.layers[i] if cache is not None else None)
        h = self.norm_f(h)
        if prompt is not None:
            h = take_positions(h, prompt.shape[0], keep, 1)
        if cache is not None:
            cache.seqlen_offset += h.shape[1] + (prompt.shape[0] if prompt is not None else 0)
        return h


class MambaForCausalLM(nn.Module):
    def __init__(self, config: MambaConfig, init=True):
        super().__init__()
        self.config = config
        self.backbone = MambaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight
        if init:
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """Random weights with the scales of a trained Mamba (for tests and benchmarks)."""
        c = self.config
        nn.init.normal_(self.backbone.embeddings.weight, std=0.02)
        for layer in self.backbone.layers:
            m = layer.mixer
            m.reset_parameters(c.time_step_min, c.time_step_max, c.time_step_floor, c.time_step_scale)
            for lin in (m.in_proj, m.x_proj, m.out_proj):
                nn.init.kaiming_uniform_(lin.weight, a=5 ** 0.5)
            m.out_proj.weight.div_(c.num_hidden_layers ** 0.5)
        if not c.tie_word_embeddings:
            nn.init.normal_(self.lm_head.weight, std=0.02)

    @classmethod
    def from_pretrained(cls, name_or_path, dtype=None):
        """Load a local directory or hub id in the Hugging Face or original state-spaces format."""
        from .checkpoint import load_pretrained
        return load_pretrained(cls, name_or_path, dtype)

    def save_pretrained(self, directory):
        from .checkpoint import save_pretrained
        refuse_attached(self, directory)
        save_pretrained(self, directory)

    @property
    def device(self):
        return self.lm_head.weight.device

    def forward(self, input_ids, attention_mask=None, labels=None, cache=None, return_logits=None):
        """With labels, the loss comes from a chunked head + cross-entropy that never holds the whole
        (b, T, vocab) logits, and `logits` is None unless return_logits=True."""
        check_inputs(input_ids, attention_mask, labels, self.config.vocab_size)
        h = self.backbone(input_ids, attention_mask, cache)
        if labels is not None and not return_logits:
            shifted = F.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)  # token t predicts labels[t + 1]
            if not torch.is_autocast_enabled(h.device.type):   # under autocast the loss casts h itself: a
                h = h.to(self.lm_head.weight.dtype)              # bf16 norm output needs no fp32 copy first
            loss = linear_cross_entropy(h.reshape(-1, h.shape[-1]), self.lm_head.weight, shifted)
            return CausalLMOutput(logits=None, loss=loss, cache=cache)
        logits = self.lm_head(h.to(self.lm_head.weight.dtype)).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutput(logits=logits, loss=loss, cache=cache)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, *, max_new_tokens=20, do_sample=False, temperature=1.0,
                 top_k=0, top_p=1.0, eos_token_id=None, pad_token_id=None, generator=None, use_cuda_graph=True):
        """Recurrent decoding. Pad batches on the left. Returns prompt and new tokens, (b, T + new).
        On CUDA with the kernels, the steps replay one captured CUDA graph, kept for later calls
        (models/cuda_graph.py)."""
        from . import cuda_graph
        check_sampling(max_new_tokens, do_sample, temperature, top_k, top_p)
        check_inputs(input_ids, attention_mask, None, self.config.vocab_size, values=True)
        if max_new_tokens == 0:
            return input_ids
        if attention_mask is not None and bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("generate() needs left padding: attention_mask has a 0 in its last column")
        eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
        pad = self.config.pad_token_id if pad_token_id is None else pad_token_id
        cache = MambaCache(len(self.backbone.layers))
        logits = self(input_ids, attention_mask, cache=cache).logits[:, -1]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        # the step at which every row had finished, kept on the device: asking the host every step
        # would stall the GPU behind Python once per token, so it asks every STOP_CHECK steps and
        # trims the (padding) tokens made after that step
        finished = torch.full((), max_new_tokens, device=input_ids.device)
        out, graph = [input_ids], None
        for step in range(max_new_tokens):
            token = sample(logits, do_sample, temperature, top_k, top_p, generator)
            if pad is not None:
                token = torch.where(done, torch.full_like(token, pad), token)
            out.append(token[:, None])
            if eos is not None:
                done |= token == eos
                finished = torch.where(done.all(), finished.clamp(max=step + 1), finished)
                if (step + 1) % STOP_CHECK == 0 and bool(finished <= step + 1):
                    break
            if step + 1 < max_new_tokens:
                if graph is None and use_cuda_graph and cuda_graph.usable(self, cache):
                    # a new capture needs the cache to have taken one eager step; a kept one does not
                    graph = cuda_graph.step_for(self, cache, token[:, None], capture=step > 0)
                logits = (graph(token[:, None]) if graph is not None else
                          self(token[:, None], cache=cache).logits)[:, -1]
        out = torch.cat(out, 1)
        return out[:, :input_ids.shape[1] + int(finished)] if eos is not None else out


STOP_CHECK = 8   # generate(): steps between the host's looks at whether every row has finished


def check_inputs(ids, mask, labels, vocab, values=None):
    """One-line errors for inputs that would fail deep inside or, worse, give a silent wrong result
    (labels of another shape flatten to a misaligned loss). Values are checked on the CPU (and by
    generate()); on CUDA that would cost a device sync every step, so there only shapes are."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be an integer tensor (batch, length), got "
                         f"{tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__}"
                         f"{' of ' + str(ids.dtype) if isinstance(ids, torch.Tensor) else ''}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"input_ids of shape {tuple(ids.shape)}: expected at least one sequence of at least one token")
    for name, t in (("attention_mask", mask), ("labels", labels)):
        if t is not None and tuple(t.shape) != tuple(ids.shape):
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected input_ids' shape {tuple(ids.shape)}")
    if values is None:
        values = not ids.is_cuda and not torch.compiler.is_compiling()
    if not values:
        return
    if bool(((ids < 0) | (ids >= vocab)).any()):
        raise ValueError(f"input_ids hold {int(ids.min())}..{int(ids.max())}; expected token ids in 0..{vocab - 1}")
    if mask is not None and bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
    if labels is not None and bool((((labels < 0) & (labels != -100)) | (labels >= vocab)).any()):
        raise ValueError(f"labels must be token ids in 0..{vocab - 1} or -100 (ignored)")


def check_sampling(max_new_tokens, do_sample, temperature, top_k, top_p):
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0: no top-k filtering), got {top_k!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")


def sample(logits, do_sample=False, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """Greedy, or sampling with temperature, top-k and nucleus (top-p) filtering."""
    if not do_sample:
        return logits.argmax(-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p   # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
