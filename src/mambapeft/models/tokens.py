"""Insert learned tokens into each sequence relative to its first real token, and take them out.

With left padding the tokens go after the pads, so every sequence sees exactly what it would
see alone: [pads, tokens, real] rather than [tokens, pads, real].
"""
import torch


def _leading_pads(mask):
    return (mask.cumsum(1) == 0).sum(1) if mask is not None else None


def infix_offsets(n, length, mask=None):
    """Offsets that put n tokens between n+1 equal chunks of each sequence's real tokens."""
    real = mask.sum(1) if mask is not None else torch.tensor([length])
    i = torch.arange(1, n + 1, device=real.device)
    return (i[None, :] * real[:, None]) // (n + 1)


def insert_tokens_at(seq, tokens, mask=None, dim=1, offsets=None):
    """Insert `tokens` (shaped like one batch row, n on `dim`) into `seq` (T on `dim`).

    offsets: None for a prefix, or (b or 1, n) non-decreasing positions relative to each
    sequence's first real token (token i goes before the real token at offsets[:, i]).
    Returns the longer sequence, its mask (or None) and `keep`, the new positions of the
    original elements (for `take_positions`; None for a plain prefix)."""
    b, T, n = seq.shape[0], seq.shape[dim], tokens.shape[dim - 1]
    out = torch.cat([tokens.unsqueeze(0).expand(b, *tokens.shape).to(seq.dtype), seq], dim=dim)
    pads = _leading_pads(mask)
    out_mask = None if mask is None else torch.cat([mask.new_ones(b, n), mask], dim=1)
    if offsets is None and (pads is None or not bool(pads.any())):
        return out, out_mask, None
    device = seq.device
    pads = torch.zeros(b, dtype=torch.long, device=device) if pads is None else pads
    off = torch.zeros(1, n, dtype=torch.long, device=device) if offsets is None else offsets.to(device)
    off = off.expand(b, n)
    t = torch.arange(T, device=device)[None, :]
    before = (off[:, None, :] <= (t - pads[:, None])[:, :, None]).sum(-1)   # tokens before element t
    keep = t + before                                                        # (b, T)
    token_pos = pads[:, None] + off + torch.arange(n, device=device)[None, :]
    src = torch.empty(b, T + n, dtype=torch.long, device=device)
    src.scatter_(1, token_pos, torch.arange(n, device=device).expand(b, n))
    src.scatter_(1, keep, (n + t).expand(b, T))
    out = _gather_time(out, src, dim)
    if out_mask is not None:
        out_mask = out_mask.gather(1, src)
    return out, out_mask, keep


def take_positions(seq, n, keep, dim=1):
    """The original elements of a sequence that insert_tokens_at lengthened by n."""
    return seq.narrow(dim, n, seq.shape[dim] - n) if keep is None else _gather_time(seq, keep, dim)


def _gather_time(x, idx, dim):
    shape = [1] * x.dim()
    shape[0], shape[dim] = idx.shape
    idx = idx.view(shape).expand(*[x.shape[i] if i != dim else idx.shape[1] for i in range(x.dim())])
    return x.gather(dim, idx)
