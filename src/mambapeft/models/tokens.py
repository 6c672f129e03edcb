"""Insert learned tokens in front of each sequence's first real token, and take them out again.

With left padding the tokens go after the pads, so every sequence sees exactly what it would
see alone: [pads, tokens, real] rather than [tokens, pads, real].
"""
import torch


def _leading_pads(mask):
    return (mask.cumsum(1) == 0).sum(1) if mask is not None else None


def insert_tokens(seq, tokens, mask=None, dim=1):
    """seq (b, ..., T on `dim`, ...), tokens shaped like one batch row with n on `dim`.

    Returns the longer sequence and its mask (inserted positions count as real)."""
    b, n = seq.shape[0], tokens.shape[dim - 1]
    tokens = tokens.unsqueeze(0).expand(b, *tokens.shape).to(seq.dtype)
    out = torch.cat([tokens, seq], dim=dim)
    if mask is not None:
        out_mask = torch.cat([mask.new_ones(b, n), mask], dim=1)
        pads = _leading_pads(mask)
        if bool(pads.any()):
            j = torch.arange(out.shape[dim], device=seq.device)[None, :]
            p = pads[:, None]
            idx = torch.where(j < p, n + j, torch.where(j < p + n, j - p, j))
            out = _gather_time(out, idx, dim)
            out_mask = out_mask.gather(1, idx)
        return out, out_mask
    return out, None


def remove_tokens(seq, n, mask=None, dim=1):
    """Inverse of insert_tokens for outputs: `mask` is the mask given to insert_tokens."""
    T = seq.shape[dim] - n
    pads = _leading_pads(mask)
    if pads is None or not bool(pads.any()):
        return seq.narrow(dim, n, T)
    t = torch.arange(T, device=seq.device)[None, :]
    idx = torch.where(t < pads[:, None], t, t + n)
    return _gather_time(seq, idx, dim)


def _gather_time(x, idx, dim):
    shape = [1] * x.dim()
    shape[0], shape[dim] = idx.shape
    idx = idx.view(shape).expand(*[x.shape[i] if i != dim else idx.shape[1] for i in range(x.dim())])
    return x.gather(dim, idx)
