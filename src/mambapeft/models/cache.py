"""Recurrent decoding state: per layer the last k-1 conv inputs and the SSM state."""
from dataclasses import dataclass, field


@dataclass
class LayerState:
    conv: list = field(default_factory=lambda: [None])   # per direction, (b, E, k-1)
    ssm: list = field(default_factory=lambda: [None])    # per direction, (b, E, N')


class MambaCache:
    def __init__(self, num_layers):
        self.layers = [LayerState() for _ in range(num_layers)]
        self.seqlen_offset = 0

    @property
    def is_fresh(self):
        return self.seqlen_offset == 0

    def reorder(self, index):
        """Keep batch rows `index` (beam search, dropping finished rows)."""
        for layer in self.layers:
            layer.conv = [c.index_select(0, index) for c in layer.conv]
            layer.ssm = [s.index_select(0, index) for s in layer.ssm]
