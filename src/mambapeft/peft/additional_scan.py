"""Additional-scan: n' learnable state dimensions added to every SSM.

A_new = -exp(A_log_addi) (E x n'), and 2n' extra x_proj rows give the new B and C entries. The
original states evolve exactly as before; y gains sum_j C_t[j] s_t[j] over the new states.
On FalconMamba the norms on B and C cover the model's own N columns only (ScanTensors.rms_cols):
the added columns stay raw, so the promise above holds there too (README: FalconMamba)."""
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from ..models.mixer import MixerAdapter
from .registry import register
from .settings import Common, at_least_one, setting


@dataclass
class AdditionalScanSettings(Common):
    states: int = setting(6, "n', the extra state dimensions", at_least_one)
    init: Literal["copy_first", "s4d"] = setting(
        "copy_first", "copy_first: every new A column = A's first column; s4d: continue the ladder N+1..N+n'")
    position: Literal["prefix", "suffix"] = setting("prefix", "new states first (prefix) or last (suffix)")


class AdditionalScan(MixerAdapter):
    order = 20
    mergeable = False

    def __init__(self, mixer, states, init="copy_first", position="prefix", direction=0):
        super().__init__()
        s = mixer.compose(adapters=[]).dirs[direction]
        E = s.A_log.shape[0]
        self.direction, self.states, self.prefix = direction, states, position == "prefix"
        if init == "copy_first":
            a = s.A_log.detach().float()[:, :1].expand(E, states).clone()
        else:  # "s4d": continue the S4D-real ladder 1..N with N+1..N+n'
            N = s.A_log.shape[1]
            a = torch.log(torch.arange(N + 1, N + states + 1, dtype=torch.float32)).expand(E, states).clone()
        self.A_log = nn.Parameter(a)
        self.x_proj = nn.Linear(E, 2 * states, bias=False)  # rows: X_B then X_C

    def edited_weights(self, mixer):
        return []   # x_proj's rows are only concatenated with new ones: exact whatever its dtype

    def compose(self, c, mixer, merge=False):
        s = c.dirs[self.direction]
        R, N = s.dt_w.shape[1], s.state_size
        dt, B, C = s.x_proj.split([R, N, N], 0)
        new_B, new_C = self.x_proj.weight.to(s.x_proj.dtype).split(self.states, 0)
        A_new = self.A_log.to(s.A_log.dtype)
        if self.prefix:
            s.x_proj = torch.cat([dt, new_B, B, new_C, C], 0)
            s.A_log = torch.cat([A_new, s.A_log], 1)
            s.rms_cols = (s.rms_cols[0] + self.states, s.rms_cols[1] + self.states)  # FalconMamba's norm
        else:
            s.x_proj = torch.cat([dt, B, new_B, C, new_C], 0)
            s.A_log = torch.cat([s.A_log, A_new], 1)


register("additional_scan", AdditionalScanSettings, "Additional-scan", "extra learnable SSM state dimensions",
         lambda site, name, s: site.per_direction(name, lambda m, d: AdditionalScan(m, s.states, s.init, s.position, d)))
