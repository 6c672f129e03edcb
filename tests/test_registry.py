"""One registry entry per method; modules stamped with their method; the model layer names no
method, and what the fused CUDA path lays out through the MixerAdapter hooks is exactly what the
readable path computes (checked here on the CPU: the layout code is plain torch)."""
import ast
from pathlib import Path

import torch
from test_peft import ALL_LM, make, perturb

from mambapeft.models import mixer_cuda
from mambapeft.models.adapter import peft_dicts
from mambapeft.peft import METHODS, PeftConfig, get_peft_model


def test_every_method_registers_how_it_attaches_and_stamps_its_modules():
    assert all((s.attach is None) != (s.base_params is None) for s in METHODS.values())
    peft = get_peft_model(make("lm"), PeftConfig(ALL_LM))
    stamps = {a.method for d in peft_dicts(peft.base_model) for a in d.values()}
    assert stamps == set(ALL_LM)


def test_model_layer_imports_no_peft_module():
    for path in (Path(mixer_cuda.__file__).parent).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not any("peft" in n for n in names), f"{path.name} imports {names}"


def test_fused_path_layout_equals_the_readable_path():
    methods = {"lora_in_proj": {}, "lora_X": {}, "lora_Z": {"r": 3}, "lora_out_proj": {}, "parallel_adapter": {},
               "lora_x_proj": {"dora": True}}
    peft = get_peft_model(make("lm"), PeftConfig(methods))
    perturb(peft)
    m = peft.base_model.backbone.layers[0].mixer
    c = m.compose()
    h = torch.randn(2, 5, m.d_model)
    with torch.no_grad():
        want = m.project_in(h, c).transpose(1, 2)
        m.project_in = None   # the in-place low-rank rows, not the fallback
        torch.testing.assert_close(mixer_cuda._project_in(m, c, h)[0], want, rtol=1e-6, atol=1e-6)
        del m.project_in
        taps = mixer_cuda._output_taps(m)
        assert len(taps) == 2
        g = torch.randn(2, m.d_inner, 5)
        W = torch.cat([c.out_proj] + [w for w, _ in taps], 0)
        wide = g.transpose(1, 2) @ W.t()               # what the kernel's out_proj returns
        out, off = wide[..., :m.d_model], m.d_model
        for w, finish in taps:
            out = finish(wide[..., off:off + w.shape[0]], out)
            off += w.shape[0]
        torch.testing.assert_close(out, m.project_out(g, c), rtol=1e-6, atol=1e-6)


def test_an_adapter_without_hooks_sends_the_fused_path_to_its_fallback():
    from mambapeft.models import MixerAdapter

    class Gate(MixerAdapter):
        def adapt_xz(self, h, xz):
            return xz * 2

    m = make("lm").backbone.layers[0].mixer
    m.peft["gate"] = Gate()
    h = torch.randn(2, 5, m.d_model)
    with torch.no_grad():
        c = m.compose()
        torch.testing.assert_close(mixer_cuda._project_in(m, c, h)[0], m.project_in(h, c).transpose(1, 2))
    assert mixer_cuda._output_taps(m) == []
