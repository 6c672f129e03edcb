"""Vision Mamba (Vim) with a middle CLS token, with the parameter names of hustvl/Vim.

Matches `vim_{tiny,small,base}_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2`
in hustvl/Vim `vim/models_mamba.py`: 16x16 patch embedding, the CLS token inserted at index
num_patches // 2 (98 for 224x224), absolute position embedding, pre-norm RMSNorm blocks with the
bidirectional ("bimamba v2") mixer and residual in fp32, final RMSNorm, linear head on the CLS
feature. The Vim block order (add -> norm -> mixer, drop path on the previous block's output)
is the same computation as our pre-norm block h + drop_path_i(mixer_i(norm_i(h))) with
drop_path_i = linspace(0, drop_path_rate, depth)[i].

Checkpoints: `VisionMamba.from_pretrained` reads the `.pth` files of hustvl/Vim-*-midclstok
(a dict with the weights under "model"), a plain state dict, or a directory written by
`save_pretrained` (`config.json` + `model.safetensors`).
"""
import argparse
import math
import os
import re
import warnings
from dataclasses import asdict, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..io import CheckpointError, read_json, read_weights, resolve_dir, write_json, write_safetensors
from .adapter import active, refuse_attached
from .block import MambaBlock, prompt_tokens
from .config import VimConfig
from .norm import RMSNorm

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class PatchEmbed(nn.Module):
    """(b, C, H, W) -> (b, G*G, D), row-major over the patch grid (as timm / Vim); G = (H - p) / stride + 1,
    so stride 8 with 16x16 patches (the `*_stride8_*` releases) gives 27 x 27 overlapping patches at 224."""

    def __init__(self, img_size, patch_size, in_chans, embed_dim, stride=None):
        super().__init__()
        stride = stride or patch_size
        self.img_size, self.patch_size = img_size, patch_size
        self.grid_size = (img_size - patch_size) // stride + 1
        self.num_patches = self.grid_size ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride)

    def forward(self, images):
        if images.dim() != 4 or images.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"expected images of shape (b, {self.proj.in_channels}, {self.img_size}, "
                             f"{self.img_size}), got {tuple(images.shape)}; to use another size, load the "
                             "checkpoint with from_pretrained(..., img_size=...) to resize the position embedding")
        return self.proj(images).flatten(2).transpose(1, 2)


class VisionMamba(nn.Module):
    def __init__(self, config: VimConfig, init=True):
        super().__init__()
        self.config = c = config
        D = c.hidden_size
        self.patch_embed = PatchEmbed(c.img_size, c.patch_size, c.in_chans, D, c.patch_stride)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, c.num_patches + 1, D))
        dpr = torch.linspace(0, c.drop_path_rate, c.num_hidden_layers, device="cpu").tolist()
        self.layers = nn.ModuleList(
            MambaBlock(D, eps=c.layer_norm_epsilon, residual_in_fp32=c.residual_in_fp32, drop_path=dpr[i],
                       d_state=c.state_size, expand=c.expand, d_conv=c.conv_kernel, dt_rank=c.time_step_rank,
                       bias=c.use_bias, conv_bias=c.use_conv_bias, bidirectional=True,
                       divide_out=c.if_divide_out)
            for i in range(c.num_hidden_layers))
        self.norm_f = RMSNorm(D, c.layer_norm_epsilon)
        self.head = nn.Linear(D, c.num_classes)
        self.peft = nn.ModuleDict()
        if init:
            self.reset_parameters()

    @property
    def device(self):
        return self.head.weight.device

    @property
    def cls_index(self):
        """Index of the CLS token in the sequence without prompt tokens."""
        return self.patch_embed.num_patches // 2

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self):
        """Random weights as Vim initialises them (trunc normal 0.02 for cls/pos/head, LeCun normal
        patch embedding, the Mamba init for A/D/dt of both directions, out_proj / sqrt(depth))."""
        c = self.config
        proj = self.patch_embed.proj
        fan_in = proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1]
        std = math.sqrt(1.0 / fan_in) / 0.87962566103423978  # std of N(0,1) truncated to [-2, 2]
        nn.init.trunc_normal_(proj.weight, std=std, a=-2 * std, b=2 * std)
        nn.init.zeros_(proj.bias)
        nn.init.trunc_normal_(self.pos_embed, std=c.initializer_range)
        nn.init.trunc_normal_(self.cls_token, std=c.initializer_range)
        nn.init.trunc_normal_(self.head.weight, std=c.initializer_range)
        nn.init.zeros_(self.head.bias)
        for layer in self.layers:
            m = layer.mixer
            m.reset_parameters(c.time_step_min, c.time_step_max, c.time_step_floor, c.time_step_scale)
            for s in m.directions:
                getattr(m, "conv1d" + s).reset_parameters()
                nn.init.kaiming_uniform_(getattr(m, "x_proj" + s).weight, a=5 ** 0.5)
            for lin in (m.in_proj, m.out_proj):
                nn.init.kaiming_uniform_(lin.weight, a=5 ** 0.5)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
            m.out_proj.weight.div_(max(c.num_hidden_layers, 1) ** 0.5)
            layer.norm.weight.fill_(1.0)
        self.norm_f.weight.fill_(1.0)

    # --------------------------------------------------------------- forward
    def embed(self, images):
        """Patch embeddings with CLS and position embedding, and prompt tokens around them.

        Returns the sequence (b, T, D) and the index of the CLS token in it."""
        adapters = active(self.peft)
        x = self.patch_embed(images.to(self.patch_embed.proj.weight.dtype))   # (b, P, D)
        for a in adapters:
            x = a.adapt_embed(images, x)
        cls, pos = self.cls_token, self.pos_embed
        for a in adapters:
            cls = a.adapt_param("cls_token", cls)
            pos = a.adapt_param("pos_embed", pos)
        b, mid = x.shape[0], self.cls_index
        x = torch.cat([x[:, :mid], cls.expand(b, -1, -1).to(x.dtype), x[:, mid:]], dim=1) + pos.to(x.dtype)
        prompt = prompt_tokens(adapters)
        if prompt is not None:  # half before the sequence, the rest after it
            k = prompt.shape[0] // 2
            p = prompt.to(x.dtype).unsqueeze(0).expand(b, -1, -1)
            x = torch.cat([p[:, :k], x, p[:, k:]], dim=1)
            mid += k
        return x, mid

    def forward_features(self, images):
        """images (b, C, H, W) -> the CLS feature after the final norm, (b, D)."""
        h, cls_index = self.embed(images)
        for layer in self.layers:
            h = layer(h)
        return self.norm_f(h[:, cls_index])

    def forward(self, images):
        """images (b, C, H, W) -> logits (b, num_classes), fp32."""
        feat = self.forward_features(images)
        return self.head(feat.to(self.head.weight.dtype)).float()

    # ----------------------------------------------------------- checkpoints
    def base_state_dict(self):
        """The weights without any attached PEFT module (no name has a `peft` component)."""
        return {k: v for k, v in self.state_dict().items() if "peft" not in k.split(".")}

    def save_pretrained(self, save_directory):
        """Write `config.json` and `model.safetensors` (base weights only: adapters are saved by the
        PEFT wrapper; merge them first to keep them in the base weights)."""
        refuse_attached(self, save_directory)
        write_json(os.path.join(save_directory, CONFIG_NAME), {**asdict(self.config), "model_type": "vim"})
        write_safetensors(os.path.join(save_directory, WEIGHTS_NAME), self.base_state_dict(),
                          metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, path_or_file, config=None, num_classes=None, img_size=None):
        """Load hustvl/Vim-*-midclstok weights (`.pth`), a plain state dict, or a `save_pretrained` directory.

        path_or_file: a `.pth`/`.pt`/`.bin`/`.safetensors` file, a directory holding `config.json` +
            `model.safetensors` or exactly one `.pth`, or a Hugging Face hub id such as
            "hustvl/Vim-small-midclstok" (fetched with huggingface_hub; the hub cache is used offline).
        config: the VimConfig to build; by default read from config.json or inferred from the shapes
            (if_divide_out=True, as in every released midclstok model; the patch stride comes from the
            model name and input size in a hustvl training checkpoint's "args" when it has them, else the
            stride that fits the grid at 224x224, else the patch size).
        num_classes: a new head size; a head of another size in the checkpoint is re-initialised
            (with a warning).
        img_size: a new input size; the position embedding of the patch grid is resized with bicubic
            interpolation, the CLS position embedding (at the middle index) is kept as it is.

        Only the weights under "model" of a training checkpoint are read; the other entries of such
        a checkpoint ("model_ema", "optimizer", "lr_scheduler", "scaler", "epoch", "args") are training
        state and are skipped.
        """
        sd, file_config, source, hints = _read_checkpoint(path_or_file)
        ckpt_config = config if config is not None else file_config
        if ckpt_config is None:
            ckpt_config = infer_vim_config(sd, source, **hints)
        overrides = {}
        if num_classes is not None:
            overrides["num_classes"] = num_classes
        if img_size is not None:
            overrides["img_size"] = img_size
        target = replace(ckpt_config, **overrides) if overrides else ckpt_config
        model = cls(target)
        sd = dict(sd)
        # head of another size: start a new one
        head_w = sd.get("head.weight")
        if head_w is not None and head_w.shape[0] != target.num_classes:
            warnings.warn(f"{source}: the checkpoint's head has {head_w.shape[0]} classes, the model "
                          f"{target.num_classes}; head.weight and head.bias are newly initialised")
            sd.pop("head.weight")
            sd.pop("head.bias", None)
            sd["head.weight"], sd["head.bias"] = model.head.weight.detach(), model.head.bias.detach()
        # position embedding of another grid: resize it
        pe = sd.get("pos_embed")
        if pe is not None and pe.dim() == 3 and pe.shape[1] != model.pos_embed.shape[1] \
                and pe.shape[2] == model.pos_embed.shape[2]:
            sd["pos_embed"] = resize_pos_embed(pe, model.patch_embed.grid_size, source)
        _load_strict(model, sd, source)
        return model.eval()   # as transformers: no drop-path until .train()


# -------------------------------------------------------------------- helpers
def resize_pos_embed(pos_embed, new_grid, source="pos_embed"):
    """(1, g*g + 1, D) with the CLS embedding at index g*g // 2 -> (1, G*G + 1, D), CLS at G*G // 2.

    The patch part is resized as a g x g image with bicubic interpolation (align_corners=False).
    Note: hustvl/Vim's main.py resizes treating index 0 as the CLS embedding, which is wrong for
    the middle-CLS models; here the CLS embedding is taken from, and put back at, the middle."""
    n = pos_embed.shape[1] - 1
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"{source}: pos_embed has {n} patch positions, not a square grid")
    mid, D = n // 2, pos_embed.shape[2]
    cls = pos_embed[:, mid:mid + 1]
    grid = torch.cat([pos_embed[:, :mid], pos_embed[:, mid + 1:]], dim=1)
    dtype = grid.dtype
    grid = grid.float().reshape(1, g, g, D).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, D).to(dtype)
    new_mid = new_grid * new_grid // 2
    return torch.cat([grid[:, :new_mid], cls, grid[:, new_mid:]], dim=1)


def infer_vim_config(sd, source="checkpoint", patch_stride=None, img_size=None):
    """A VimConfig from the shapes of a Vim state dict. The shapes hold the kernel size and the grid,
    not the stride: `patch_stride` / `img_size` give it (a checkpoint's training arguments), else
    the input is taken to be 224x224 (every release) when a stride up to the kernel size fits that,
    else the stride is the kernel size."""
    need = ["patch_embed.proj.weight", "pos_embed", "layers.0.mixer.in_proj.weight", "layers.0.mixer.A_log",
            "layers.0.mixer.dt_proj.weight", "layers.0.mixer.conv1d.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise ValueError(f"{source}: not a Vision Mamba state dict (lacks {', '.join(missing)}); "
                         f"its first names are {', '.join(list(sd)[:8])}")
    pw = sd["patch_embed.proj.weight"]
    D, in_chans, patch = pw.shape[0], pw.shape[1], pw.shape[2]
    n = sd["pos_embed"].shape[1] - 1
    grid = math.isqrt(n)
    if grid * grid != n:
        raise ValueError(f"{source}: pos_embed has {n} patch positions, not a square grid")
    if patch_stride is None and img_size is not None and grid > 1 and (img_size - patch) % (grid - 1) == 0:
        patch_stride = (img_size - patch) // (grid - 1)
    if patch_stride is None and grid > 1 and (224 - patch) % (grid - 1) == 0 and (224 - patch) // (grid - 1) <= patch:
        patch_stride = (224 - patch) // (grid - 1)
    patch_stride = patch_stride or patch
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    E = sd["layers.0.mixer.in_proj.weight"].shape[0] // 2
    if E % D:
        raise ValueError(f"{source}: in_proj gives an inner width {E} that is not a multiple of the width {D}")
    if not any(k.endswith(".mixer.A_b_log") for k in sd):
        raise ValueError(f"{source}: the mixers have no backward direction (A_b_log); only the bidirectional "
                         "'bimamba v2' Vim models are supported")
    head = sd.get("head.weight")
    return VimConfig(
        img_size=(grid - 1) * patch_stride + patch, patch_size=patch, patch_stride=patch_stride, in_chans=in_chans,
        hidden_size=D, num_hidden_layers=depth,
        state_size=sd["layers.0.mixer.A_log"].shape[1], expand=E // D,
        conv_kernel=sd["layers.0.mixer.conv1d.weight"].shape[-1],
        time_step_rank=sd["layers.0.mixer.dt_proj.weight"].shape[1],
        num_classes=head.shape[0] if head is not None else VimConfig.num_classes,
        use_bias="layers.0.mixer.in_proj.bias" in sd, use_conv_bias="layers.0.mixer.conv1d.bias" in sd)


def _load_strict(model, sd, source):
    expected = model.base_state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        lines = [f"{source}: the checkpoint's names do not match VisionMamba({_short(model.config)})"]
        if missing:
            lines.append(f"  missing ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): {', '.join(unexpected)}")
        raise ValueError("\n".join(lines))
    bad = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
           for k, v in expected.items() if tuple(sd[k].shape) != tuple(v.shape)]
    if bad:
        raise ValueError(f"{source}: shapes do not match VisionMamba({_short(model.config)}):\n  " + "\n  ".join(bad))
    model.load_state_dict(sd, strict=False)


def _short(c):
    return (f"hidden_size={c.hidden_size}, layers={c.num_hidden_layers}, state_size={c.state_size}, "
            f"img_size={c.img_size}, patch_size={c.patch_size}, patch_stride={c.patch_stride}, "
            f"num_classes={c.num_classes}")


def _read_checkpoint(path):
    """-> (state dict, VimConfig or None, a name for messages, hints for infer_vim_config)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        sd, hints = _read_file(path)
        return sd, None, path, hints
    if path.endswith((".pth", ".pt", ".bin", ".safetensors")):
        raise CheckpointError(f"{path}: no such checkpoint file")
    return _read_directory(str(resolve_dir(path, patterns=("*.pth", CONFIG_NAME, WEIGHTS_NAME))), label=path)


def _read_directory(directory, label=None):
    label = label or directory
    cfg_file, weights = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
    if os.path.isfile(weights):
        config = None
        if os.path.isfile(cfg_file):
            d = read_json(cfg_file)
            if not isinstance(d, dict):
                raise CheckpointError(f"{cfg_file}: expected a JSON object, got {type(d).__name__}")
            if d.get("model_type", "vim") != "vim":
                raise CheckpointError(f"{cfg_file}: model_type={d['model_type']!r}, expected 'vim'")
            known = {f.name for f in fields(VimConfig)}
            try:
                config = VimConfig(**{k: v for k, v in d.items() if k in known})
            except ValueError as e:
                raise CheckpointError(f"{cfg_file}: {e}") from None
        return _read_file(weights)[0], config, weights, {}
    pths = sorted(f for f in os.listdir(directory) if f.endswith((".pth", ".pt")))
    if len(pths) != 1:
        found = ", ".join(pths) if pths else "none"
        raise CheckpointError(f"{label}: expected {WEIGHTS_NAME} or exactly one .pth checkpoint in "
                              f"{directory}, found {found}; pass the file's path instead")
    f = os.path.join(directory, pths[0])
    sd, hints = _read_file(f)
    return sd, None, f, hints


def _read_file(path):
    """-> (state dict, {"patch_stride", "img_size"} known from a hustvl training checkpoint's args)."""
    # hustvl/Vim training checkpoints store the run's arguments as an argparse.Namespace under "args"
    obj = read_weights(path, allowed_globals=[argparse.Namespace])
    return _state_dict_of(obj, path), _hints(obj.get("args") if isinstance(obj, dict) else None)


def _hints(args):
    """The stride and input size of the run that wrote the checkpoint: its `--model` name says
    `..._patch16_stride8_224_...` for the Vim-*+ releases, and `--input-size` the image size."""
    args = vars(args) if isinstance(args, argparse.Namespace) else args if isinstance(args, dict) else {}
    hints = {}
    found = re.search(r"_stride(\d+)_", str(args.get("model", "")))
    if found:
        hints["patch_stride"] = int(found.group(1))
    if isinstance(args.get("input_size"), int):
        hints["img_size"] = args["input_size"]
    return hints


def _state_dict_of(obj, path):
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict (a state dict or a checkpoint with 'model'), "
                         f"got {type(obj).__name__}")
    if "model" in obj and isinstance(obj["model"], dict):
        sd = obj["model"]  # as hustvl/Vim; model_ema/optimizer/args... are training state, skipped
    elif "state_dict" in obj and isinstance(obj["state_dict"], dict):
        sd = obj["state_dict"]
    else:
        sd = obj
    not_tensors = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"{path}: not a state dict: entries {', '.join(map(str, not_tensors[:8]))} are not "
                         f"tensors (top-level keys: {', '.join(map(str, list(obj)[:12]))})")
    if sd and all(k.startswith("module.") for k in sd):  # saved from a DistributedDataParallel wrapper
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd
