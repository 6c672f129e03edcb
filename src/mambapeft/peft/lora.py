"""LoRA, partial LoRA (LoRA_p) and DoRA on the mixer's projections, and LoRA on the embedding.

Activation form s*U(Dropout(V h)) is used on in_proj (whole, X or Z rows) and out_proj; merged
form W + s*U V on x_proj (whole, d, B or C rows) and dt_proj, which sit inside the scan. DoRA
always uses the merged form, with the norm taken per output row (as Hugging Face peft does) over
the rows the adapter touches: W_new = m * W'' / ||W''||, the norm detached, m = ||W|| at start.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.adapter import ModelAdapter
from ..models.mixer import LowRankRows, MixerAdapter
from .registry import register
from .settings import Common, at_least_one, probability, setting


@dataclass
class LoRASettings(Common):
    r: int = setting(8, "rank", at_least_one)
    scale: float = setting(0.1, "plain scale s of the update (no alpha / r)")
    dropout: float = setting(0.1, "dropout on the activation form (in_proj, X, Z, out_proj); merged forms "
                                  "have none", probability)
    dora: bool = setting(False, "DoRA: a learned magnitude per output row; always the merged form")


@dataclass
class EmbedLoRASettings(Common):
    r: int = setting(8, "rank", at_least_one)
    scale: float = setting(0.1, "plain scale s of the update (no alpha / r)")
    dora: bool = setting(False, "DoRA per token row (LM) or per output channel of the patch kernel (Vim)")


def matmul_input(x, w):
    """x as a product with the fp32 factor w should read it. Without autocast, in w's dtype (fp32
    factors on a half base). Under autocast as it is: the product casts it to the autocast dtype
    anyway, and an fp32 copy of a bf16 input (the memory-efficient norm's output) would only make
    that cast a second bf16 copy, kept for the backward beside the input itself."""
    return x if torch.is_autocast_enabled(x.device.type) else x.to(w.dtype)


class LowRank(nn.Module):
    """Lambda_r(in -> out): down V (default Linear init), up U (zeros)."""

    def __init__(self, d_in, d_out, r, scale, dropout=0.0):
        super().__init__()
        self.down = nn.Linear(d_in, r, bias=False)
        self.up = nn.Linear(r, d_out, bias=False)
        nn.init.zeros_(self.up.weight)
        self.scale = scale
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.finish(self.down(matmul_input(x, self.down.weight)))

    def finish(self, p):
        """From the down projection p = V x on: s * U(Dropout(p))."""
        return self.up(self.dropout(p.to(self.up.weight.dtype))) * self.scale

    def delta_weight(self):
        return (self.up.weight @ self.down.weight) * self.scale


def get_weight(c, target, d):
    return c.in_proj if target == "in_proj" else c.out_proj if target == "out_proj" else \
        c.dirs[d].x_proj if target == "x_proj" else c.dirs[d].dt_w


def set_weight(c, target, d, w):
    if target == "in_proj":
        c.in_proj = w
    elif target == "out_proj":
        c.out_proj = w
    elif target == "x_proj":
        c.dirs[d].x_proj = w
    else:
        c.dirs[d].dt_w = w


def replace_rows(w, start, stop, rows):
    return torch.cat([w[:start], rows, w[stop:]], 0) if (start, stop) != (0, w.shape[0]) else rows


class MixerLoRA(MixerAdapter):
    order = 10

    def __init__(self, mixer, target, rows, r, scale, dropout, dora, direction=0, activation_form=False):
        super().__init__()
        w = get_weight(mixer.compose(adapters=[]), target, direction)
        self.target, self.direction = target, direction
        self.start, self.stop = rows if rows is not None else (0, w.shape[0])
        self.activation_form = activation_form and not dora
        self.lora = LowRank(w.shape[1], self.stop - self.start, r, scale, dropout if self.activation_form else 0.0)
        self.magnitude = nn.Parameter(w[self.start:self.stop].detach().float().norm(dim=1)) if dora else None

    def compose(self, c, mixer, merge=False):
        if not self.activation_form:
            self._add_delta(c)

    def fold(self, c, mixer):
        if self.activation_form:
            self._add_delta(c)

    def _add_delta(self, c):
        w = get_weight(c, self.target, self.direction)
        rows = w[self.start:self.stop] + self.lora.delta_weight().to(w.dtype)
        if self.magnitude is not None:
            rows = dora_rows(rows, self.magnitude)
        set_weight(c, self.target, self.direction, replace_rows(w, self.start, self.stop, rows))

    def _add(self, inp, out):
        return self.add_rows(self.lora(inp), out)

    def add_rows(self, delta, out):
        """out + delta placed on this adapter's rows of the output features."""
        delta = delta.to(out.dtype)
        if (self.start, self.stop) == (0, out.shape[-1]):
            return out + delta
        return out + F.pad(delta, (self.start, out.shape[-1] - self.stop))

    def adapt_xz(self, h, xz):
        return self._add(h, xz) if self.activation_form and self.target == "in_proj" else xz

    def adapt_out(self, g, out):
        return self._add(g, out) if self.activation_form and self.target == "out_proj" else out

    def in_proj_rows(self):
        if not (self.activation_form and self.target == "in_proj"):
            return []
        lora = self.lora
        return [LowRankRows(self.start, self.stop, lambda h: lora.dropout(lora.down(matmul_input(h, lora.down.weight))),
                            lora.up.weight, lora.scale)]

    def out_proj_taps(self):
        if not (self.activation_form and self.target == "out_proj"):
            return []
        return [(self.lora.down.weight, lambda p, out: self.add_rows(self.lora.finish(p), out))]


def dora_rows(w, magnitude):
    """DoRA on a weight whose rows (dim 0) are the normalised units: m * w / ||w||, norm detached."""
    norm = w.float().flatten(1).norm(dim=1).detach()
    return w * (magnitude / norm).to(w.dtype).view(-1, *([1] * (w.dim() - 1)))


class TokenEmbeddingLoRA(ModelAdapter):
    """Language model: emb += s * A[ids] B, A ~ N(0, 1) (V x r), B = 0 (r x D). With DoRA each token's
    row is renormalised to a learned magnitude (only the looked-up rows are computed)."""
    mergeable = True

    def __init__(self, embedding, r, scale, dora=False):
        super().__init__()
        self.A = nn.Parameter(torch.randn(embedding.num_embeddings, r))
        self.B = nn.Parameter(torch.zeros(r, embedding.embedding_dim))
        self.scale = scale
        self.magnitude = nn.Parameter(embedding.weight.detach().float().norm(dim=1)) if dora else None

    def adapt_embed(self, ids, emb):
        rows = emb + (F.embedding(ids, self.A) @ self.B).to(emb.dtype) * self.scale
        if self.magnitude is None:
            return rows
        flat = rows.reshape(-1, rows.shape[-1])
        return dora_rows(flat, F.embedding(ids.reshape(-1), self.magnitude[:, None])[:, 0]).view_as(rows)

    def merged_weight(self, w):
        w2 = w + ((self.A @ self.B) * self.scale).to(w.dtype)
        return w2 if self.magnitude is None else dora_rows(w2, self.magnitude)

    def merge_into(self, model):
        if model.config.tie_word_embeddings:  # the LoRA changes inputs only: the head keeps the old weight
            model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone(),
                                                requires_grad=model.lm_head.weight.requires_grad)
            model.config.tie_word_embeddings = False
        w = model.backbone.embeddings.weight
        w.copy_(self.merged_weight(w))


class PatchEmbeddingLoRA(ModelAdapter):
    """Vim: a LoRA of the patch-embedding convolution (k x k stride k down, 1 x 1 up). With DoRA the
    merged kernel is renormalised per output channel, and the patch embedding recomputed with it."""
    mergeable = True

    def __init__(self, proj: nn.Conv2d, r, scale, dora=False):
        super().__init__()
        self.down = nn.Conv2d(proj.in_channels, r, proj.kernel_size, proj.stride, bias=False)
        self.up = nn.Conv2d(r, proj.out_channels, 1, bias=False)
        nn.init.zeros_(self.up.weight)
        self.scale = scale
        self._proj = [proj]  # a plain list: the base weights belong to the model
        self.magnitude = nn.Parameter(proj.weight.detach().float().flatten(1).norm(dim=1)) if dora else None

    def adapt_embed(self, images, emb):
        if self.magnitude is None:
            return emb + (self.up(self.down(images.to(self.down.weight.dtype))).flatten(2).transpose(1, 2) * self.scale).to(emb.dtype)
        proj = self._proj[0]
        w = self.merged_weight(proj.weight)
        return F.conv2d(images.to(w.dtype), w, proj.bias, proj.stride).flatten(2).transpose(1, 2).to(emb.dtype)

    def merged_weight(self, w):
        delta = torch.einsum("or,rikl->oikl", self.up.weight[:, :, 0, 0], self.down.weight) * self.scale
        w2 = w + delta.to(w.dtype)
        return w2 if self.magnitude is None else dora_rows(w2, self.magnitude)

    def merge_into(self, model):
        w = model.patch_embed.proj.weight
        w.copy_(self.merged_weight(w))


# ---- registry ------------------------------------------------------------------------------------
def _mixer_lora(target, rows, activation_form):
    """attach() of a LoRA on `target`, on rows(mixer) = (start, stop) of it or on all of it."""
    def make(s, m, d):
        return MixerLoRA(m, target, rows(m) if rows else None, s.r, s.scale, s.dropout, s.dora, d, activation_form)

    def attach(site, name, s):
        if target in ("in_proj", "out_proj"):   # shared by both scan directions
            site.per_mixer(name, lambda m: {name: make(s, m, 0)})
        else:
            site.per_direction(name, lambda m, d: make(s, m, d))
    return attach


def _attach_embedding(site, name, s):
    if site.kind == "lm":
        emb = site.backbone.embeddings
        site.put(site.backbone.peft, name, TokenEmbeddingLoRA(emb, s.r, s.scale, s.dora), emb.weight)
    else:
        proj = site.model.patch_embed.proj
        site.put(site.backbone.peft, name, PatchEmbeddingLoRA(proj, s.r, s.scale, s.dora), proj.weight)


def _x_rows(m):
    return 0, m.d_inner


def _z_rows(m):
    return m.d_inner, 2 * m.d_inner


def _d_rows(m):
    return 0, m.dt_rank


def _b_rows(m):
    return m.dt_rank, m.dt_rank + m.d_state


def _c_rows(m):
    return m.dt_rank + m.d_state, m.dt_rank + 2 * m.d_state


for _name, _target, _rows, _act, _help in [
        ("lora_in_proj", "in_proj", None, True, "LoRA on the whole in_proj (activation form)"),
        ("lora_out_proj", "out_proj", None, True, "LoRA on out_proj (activation form)"),
        ("lora_x_proj", "x_proj", None, False, "LoRA on the whole x_proj (merged form; per direction in Vim)"),
        ("lora_dt", "dt_proj", None, False, "LoRA on the dt_proj weight (merged form; per direction in Vim)")]:
    register(_name, LoRASettings, "LoRA", _help, _mixer_lora(_target, _rows, _act))
register("lora_embed", EmbedLoRASettings, "LoRA", "LoRA on the token embedding (LM) or the patch embedding (Vim)",
         _attach_embedding)
for _name, _target, _rows, _act, _help in [
        ("lora_X", "in_proj", _x_rows, True, "LoRA on in_proj rows 0..E-1 (the x branch)"),
        ("lora_Z", "in_proj", _z_rows, True, "LoRA on in_proj rows E..2E-1 (the z gate)"),
        ("lora_d", "x_proj", _d_rows, False, "LoRA on the delta rows of x_proj"),
        ("lora_B", "x_proj", _b_rows, False, "LoRA on the B rows of x_proj"),
        ("lora_C", "x_proj", _c_rows, False, "LoRA on the C rows of x_proj")]:
    register(_name, LoRASettings, "Partial LoRA", _help, _mixer_lora(_target, _rows, _act))
