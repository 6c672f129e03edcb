import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import argparse  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mambapeft.io import CheckpointError  # noqa: E402
from mambapeft.models.adapter import ModelAdapter  # noqa: E402
from mambapeft.models.config import VimConfig  # noqa: E402
from mambapeft.models.vim import VisionMamba, resize_pos_embed  # noqa: E402
from mambapeft.ops.scan import scan_backend  # noqa: E402
from mambapeft.ops.scan_ref import selective_scan_ref  # noqa: E402

try:
    import mambapeft.ops.scan_cpu  # noqa: F401
    BACKEND = "auto"   # picks the fast CPU scan on CPU tensors
except ImportError:
    BACKEND = "reference"


@pytest.fixture(autouse=True)
def _backend():
    with scan_backend(BACKEND):
        yield


def tiny(**kw):
    d = dict(img_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_classes=10, drop_path_rate=0.0)
    d.update(kw)
    return VimConfig(**d)


def make(seed=0, **kw):
    torch.manual_seed(seed)
    return VisionMamba(tiny(**kw)).eval()


def images(b=2, size=32, seed=1):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_forward_shapes_and_names():
    m = make()
    x = images()
    assert m(x).shape == (2, 10)
    assert m.forward_features(x).shape == (2, 32)
    assert m.pos_embed.shape == (1, 17, 32) and m.cls_index == 8
    names = set(m.state_dict())
    for n in ["patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed", "norm_f.weight",
              "head.weight", "head.bias", "layers.1.norm.weight", "layers.0.mixer.in_proj.weight",
              "layers.0.mixer.out_proj.weight", "layers.0.mixer.A_log", "layers.0.mixer.D",
              "layers.0.mixer.conv1d.weight", "layers.0.mixer.conv1d.bias", "layers.0.mixer.x_proj.weight",
              "layers.0.mixer.dt_proj.weight", "layers.0.mixer.dt_proj.bias", "layers.0.mixer.A_b_log",
              "layers.0.mixer.D_b", "layers.0.mixer.conv1d_b.weight", "layers.0.mixer.conv1d_b.bias",
              "layers.0.mixer.x_proj_b.weight", "layers.0.mixer.dt_proj_b.weight",
              "layers.0.mixer.dt_proj_b.bias"]:
        assert n in names, n
    assert len(names) == 7 + 2 * 17  # per layer: norm, in_proj, out_proj + 7 per direction
    with pytest.raises(ValueError, match="img_size"):
        m(images(size=48))


def test_vim_presets_build():
    c = VimConfig.preset("vim-small")
    assert (c.hidden_size, c.intermediate_size, c.time_step_rank, c.state_size, c.num_patches) == (384, 768, 24, 16, 196)
    m = VisionMamba(VimConfig.preset("vim-tiny", num_hidden_layers=1), init=False)
    assert m.pos_embed.shape == (1, 197, 192) and m.cls_index == 98


def _scan_ref_direction(mixer, x, z, s):
    """One direction of bimamba v2 from the mixer's parameters, x, z (b, E, T)."""
    conv = getattr(mixer, "conv1d" + s)
    T = x.shape[-1]
    u = F.silu(F.conv1d(x, conv.weight, conv.bias, padding=mixer.d_conv - 1, groups=mixer.d_inner)[..., :T])
    x_dbl = getattr(mixer, "x_proj" + s).weight @ u                       # (b, R + 2N, T)
    R, N = mixer.dt_rank, mixer.d_state
    dt, B, C = x_dbl[:, :R], x_dbl[:, R:R + N], x_dbl[:, R + N:]
    dtp = getattr(mixer, "dt_proj" + s)
    delta = dtp.weight @ dt
    A = -torch.exp(getattr(mixer, mixer.a_name(s)).float())
    return selective_scan_ref(u, delta, A, B, C, getattr(mixer, "D" + s).float(), z,
                              delta_bias=dtp.bias.float(), delta_softplus=True)


@pytest.mark.parametrize("divide_out", [True, False])
def test_bidirectional_mixer_matches_bimamba_v2(divide_out):
    m = make(if_divide_out=divide_out)
    mixer = m.layers[0].mixer
    with torch.no_grad():  # make the two directions differ
        for p in mixer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    h = torch.randn(2, 17, 32)
    with torch.no_grad():
        out = mixer(h)
        xz = mixer.in_proj.weight @ h.transpose(1, 2)                        # (b, 2E, T)
        x, z = xz.chunk(2, dim=1)
        g_f = _scan_ref_direction(mixer, x, z, "")
        g_b = _scan_ref_direction(mixer, x.flip(-1), z.flip(-1), "_b")
        g = g_f + g_b.flip(-1)
        if divide_out:
            g = g / 2
        ref = F.linear(g.transpose(1, 2), mixer.out_proj.weight, mixer.out_proj.bias)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_cls_token_sits_in_the_middle():
    # no layers: the feature is norm_f(cls_token + pos_embed[:, 8])
    m = make(num_hidden_layers=0)
    x = images()
    with torch.no_grad():
        want = m.norm_f(m.cls_token[0, 0] + m.pos_embed[0, m.cls_index])
        torch.testing.assert_close(m.forward_features(x), want.expand(2, -1))
    # with layers: moving a change between cls_token and pos_embed[:, middle] changes nothing
    m = make()
    d = 0.5 * torch.randn(32)
    base = m(x)
    with torch.no_grad():
        m.cls_token[0, 0] += d
    moved = m(x)
    assert not torch.allclose(moved, base, atol=1e-4)
    with torch.no_grad():
        m.cls_token[0, 0] -= d
        m.pos_embed[0, m.cls_index] += d
    torch.testing.assert_close(m(x), moved, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the same change one position away is not the same model
        m.pos_embed[0, m.cls_index] -= d
        m.pos_embed[0, m.cls_index + 1] += d
    assert not torch.allclose(m(x), moved, atol=1e-4)


class _Hooks(ModelAdapter):
    def __init__(self, n_prompt=3, D=32):
        super().__init__()
        self.tokens = nn.Parameter(torch.randn(n_prompt, D))
        self.dcls = nn.Parameter(torch.randn(1, 1, D))
        self.dpos = nn.Parameter(torch.zeros(1, 17, D))

    def adapt_embed(self, inputs, emb):
        return emb + 1.0

    def adapt_param(self, name, tensor):
        return tensor + (self.dcls if name == "cls_token" else self.dpos)

    def prompt(self):
        return self.tokens


def test_model_adapter_hooks_and_prompt_layout():
    m = make()
    a = _Hooks()
    m.peft["hooks"] = a
    x = images()
    seen = {}
    m.layers[0].register_forward_pre_hook(lambda mod, args: seen.update(h=args[0].detach()))
    feat = m.forward_features(x)
    h = seen["h"]
    assert h.shape == (2, 17 + 3, 32)
    with torch.no_grad():
        patches = m.patch_embed(x) + 1.0
        pos = m.pos_embed + a.dpos
        torch.testing.assert_close(h[:, 0], a.tokens[0].expand(2, -1))           # n // 2 = 1 before
        torch.testing.assert_close(h[:, -2:], a.tokens[1:].expand(2, -1, -1))     # the rest after
        torch.testing.assert_close(h[:, 1 + 8], (m.cls_token + a.dcls + pos[:, 8]).expand(2, -1, -1)[:, 0])
        torch.testing.assert_close(h[:, 1:1 + 8], patches[:, :8] + pos[:, :8])
        torch.testing.assert_close(h[:, 1 + 9:1 + 17], patches[:, 8:] + pos[:, 9:])
    assert feat.shape == (2, 32)
    feat.sum().backward()
    assert a.tokens.grad is not None and a.dcls.grad.abs().sum() > 0


def test_gradients_reach_every_parameter():
    m = make()
    m.train()
    loss = F.cross_entropy(m(images()), torch.tensor([1, 2]))
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name


def test_pth_roundtrip_and_inferred_config(tmp_path):
    m = make(seed=3)
    path = tmp_path / "vim.pth"
    torch.save({"model": m.state_dict()}, path)
    loaded = VisionMamba.from_pretrained(path).eval()
    for f in ("img_size", "patch_size", "hidden_size", "num_hidden_layers", "state_size", "expand",
              "conv_kernel", "time_step_rank", "num_classes"):
        assert getattr(loaded.config, f) == getattr(m.config, f), f
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(x), rtol=0, atol=0)
    # a plain state dict, and a directory holding one .pth
    torch.save(m.state_dict(), tmp_path / "plain.pt")
    with torch.no_grad():
        torch.testing.assert_close(VisionMamba.from_pretrained(tmp_path / "plain.pt").eval()(x), m(x))
    d = tmp_path / "dir"
    d.mkdir()
    torch.save({"model": m.state_dict()}, d / "vim_t_midclstok.pth")
    with torch.no_grad():
        torch.testing.assert_close(VisionMamba.from_pretrained(d).eval()(x), m(x))


def test_hustvl_style_training_checkpoint(tmp_path):
    """The training state next to "model" (args as argparse.Namespace, optimizer, ema) is skipped."""
    m = make(seed=4)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": m.state_dict(), "model_ema": m.state_dict(), "optimizer": {"state": {}, "param_groups": []},
                "lr_scheduler": {"last_epoch": 3}, "epoch": 299, "scaler": "none",
                "args": argparse.Namespace(lr=5e-4, model="vim_small", output_dir="out")}, path)
    loaded = VisionMamba.from_pretrained(path).eval()
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(x))


def test_save_pretrained_roundtrip(tmp_path):
    m = make(seed=5, num_classes=7, if_divide_out=False)
    m.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "config.json").is_file() and (tmp_path / "out" / "model.safetensors").is_file()
    loaded = VisionMamba.from_pretrained(tmp_path / "out").eval()
    assert loaded.config.if_divide_out is False and loaded.config.num_classes == 7
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(x), rtol=0, atol=0)
    # attached adapters would be lost: refused, nothing written
    m.peft["hooks"] = _Hooks()
    with pytest.raises(ValueError, match="still carries PEFT modules \\(hooks\\)"):
        m.save_pretrained(tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_resize_pos_embed_keeps_cls(tmp_path):
    m = make(seed=6)
    path = tmp_path / "vim.pth"
    torch.save({"model": m.state_dict()}, path)
    big = VisionMamba.from_pretrained(path, img_size=48).eval()   # 4x4 -> 6x6 grid
    assert big.config.img_size == 48 and big.pos_embed.shape == (1, 37, 32) and big.cls_index == 18
    torch.testing.assert_close(big.pos_embed[0, 18], m.pos_embed[0, 8])
    assert big(images(size=48)).shape == (2, 10)
    # the patch part is the bicubic resize of the old grid (CLS taken out of the middle)
    grid = torch.cat([m.pos_embed[:, :8], m.pos_embed[:, 9:]], 1).reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 36, 32)
    got = torch.cat([big.pos_embed[:, :18], big.pos_embed[:, 19:]], 1)
    torch.testing.assert_close(got, want)
    # same size is the identity, and the other weights are untouched
    torch.testing.assert_close(resize_pos_embed(m.pos_embed.detach(), 4), m.pos_embed.detach())
    torch.testing.assert_close(big.layers[1].mixer.A_b_log, m.layers[1].mixer.A_b_log)


def test_new_head_warns(tmp_path):
    m = make(seed=7)
    path = tmp_path / "vim.pth"
    torch.save({"model": m.state_dict()}, path)
    with pytest.warns(UserWarning, match="head"):
        loaded = VisionMamba.from_pretrained(path, num_classes=5)
    assert loaded.head.weight.shape == (5, 32)
    torch.testing.assert_close(loaded.norm_f.weight, m.norm_f.weight)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        VisionMamba.from_pretrained(path, num_classes=10)


class Custom:  # a class the weights-only unpickler refuses
    def __init__(self):
        self.x = 1


def test_pickled_object_gives_clear_error(tmp_path):
    m = make()
    path = tmp_path / "evil.pth"
    torch.save({"model": m.state_dict(), "extra": Custom()}, path)
    with pytest.raises(ValueError, match="refusing to unpickle") as e:
        VisionMamba.from_pretrained(path)
    assert "evil.pth" in str(e.value)


def test_mismatched_names_and_shapes(tmp_path):
    m = make()
    sd = m.state_dict()
    sd["layers.0.mixer.A_bwd_log"] = sd.pop("layers.0.mixer.A_b_log")
    sd["head_dist.weight"] = torch.zeros(10, 32)
    path = tmp_path / "renamed.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(ValueError) as e:
        VisionMamba.from_pretrained(path)
    msg = str(e.value)
    assert "missing (1): layers.0.mixer.A_b_log" in msg
    assert "unexpected (2)" in msg and "layers.0.mixer.A_bwd_log" in msg and "head_dist.weight" in msg
    # an explicit config that does not fit the shapes
    torch.save({"model": m.state_dict()}, tmp_path / "ok.pth")
    with pytest.raises(ValueError, match="shapes do not match") as e:
        VisionMamba.from_pretrained(tmp_path / "ok.pth", config=tiny(state_size=8))
    assert "layers.0.mixer.A_log: checkpoint (64, 16) vs model (64, 8)" in str(e.value)


def test_missing_file_and_hub_offline(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        VisionMamba.from_pretrained(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="exactly one .pth"):
        VisionMamba.from_pretrained(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    try:
        import huggingface_hub.constants as hc
        monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True, raising=False)
        monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"), raising=False)
    except ImportError:
        pass
    with pytest.raises(CheckpointError, match="hustvl/Vim-small-midclstok") as e:
        VisionMamba.from_pretrained("hustvl/Vim-small-midclstok")
    assert "local directory" in str(e.value)


def test_other_checkpoint_layouts(tmp_path):
    m = make(seed=8)
    x = images()
    # saved from a DistributedDataParallel wrapper
    torch.save({"model": {"module." + k: v for k, v in m.state_dict().items()}}, tmp_path / "ddp.pth")
    with torch.no_grad():
        torch.testing.assert_close(VisionMamba.from_pretrained(tmp_path / "ddp.pth").eval()(x), m(x))
    # a one-directional (non-Vim) mixer
    sd = {k: v for k, v in m.state_dict().items() if not any(s in k for s in ("_b.", "_b_", "D_b"))}
    torch.save(sd, tmp_path / "uni.pth")
    with pytest.raises(ValueError, match="bidirectional"):
        VisionMamba.from_pretrained(tmp_path / "uni.pth")
    # something that is not a state dict
    torch.save({"model": {"a": 1}}, tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="not a state dict"):
        VisionMamba.from_pretrained(tmp_path / "junk.pth")


# ---- patch stride (the `*_stride8_*` Vim-*+ releases) -----------------------------------------
def test_patch_stride_builds_overlapping_grid():
    m = make(patch_stride=4)                                  # 32x32, 8x8 patches every 4 pixels
    assert m.config.grid_size == 7 and m.pos_embed.shape == (1, 50, 32) and m.cls_index == 24
    x = images()
    with torch.no_grad():  # the patch embedding is the strided convolution, row-major over the grid
        want = F.conv2d(x, m.patch_embed.proj.weight, m.patch_embed.proj.bias, stride=4)
        torch.testing.assert_close(m.patch_embed(x), want.flatten(2).transpose(1, 2))
    assert m(x).shape == (2, 10)
    with pytest.raises(ValueError, match="stride 4"):
        tiny(img_size=30, patch_stride=4)


def test_stride8_release_layout_loads(tmp_path):
    """A checkpoint shaped like vim_s+_midclstok_ft_*.pth (16x16 patches at stride 8, 224x224: a 27x27
    grid, 730 tokens), narrow and one layer deep, with and without the training run's args."""
    torch.manual_seed(9)
    m = VisionMamba(VimConfig(hidden_size=16, num_hidden_layers=1, patch_stride=8, num_classes=3)).eval()
    assert m.pos_embed.shape == (1, 730, 16) and m.cls_index == 364
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        want = m(x)
    name = "vim_small_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2"
    torch.save({"model": m.state_dict(), "epoch": 29,
                "args": argparse.Namespace(model=name, input_size=224)}, tmp_path / "with_args.pth")
    torch.save({"model": m.state_dict()}, tmp_path / "bare.pth")   # stride from the 224x224 grid
    for f in ("with_args.pth", "bare.pth"):
        loaded = VisionMamba.from_pretrained(tmp_path / f).eval()
        assert (loaded.config.patch_stride, loaded.config.img_size) == (8, 224), f
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), want, rtol=0, atol=0)
    # the args decide when the grid alone would mislead: 8x8 patches at stride 4 on 32x32 (7x7 grid)
    s = make(seed=10, patch_stride=4)
    torch.save({"model": s.state_dict(), "args": {"model": "vim_tiny_patch8_stride4_32", "input_size": 32}},
               tmp_path / "small.pth")
    loaded = VisionMamba.from_pretrained(tmp_path / "small.pth").eval()
    assert (loaded.config.patch_stride, loaded.config.img_size) == (4, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images()), s(images()))
    # a new input size keeps the stride and resizes the 27x27 grid (240: 29x29)
    big = VisionMamba.from_pretrained(tmp_path / "bare.pth", img_size=240)
    assert big.config.grid_size == 29 and big.pos_embed.shape == (1, 842, 16)
    torch.testing.assert_close(big.pos_embed[0, 420], m.pos_embed[0, 364])
    # save_pretrained keeps the stride in config.json
    m.save_pretrained(tmp_path / "out")
    assert VisionMamba.from_pretrained(tmp_path / "out").config.patch_stride == 8
