"""Log-probabilities of target tokens straight from hidden states, in row chunks: the output head and the softmax
fused so that the (N, V) logits never exist all at once.

Why: with a 32k vocabulary the head's logits are the largest tensors of a step (1024 tokens x 32000 x 4 bytes =
131 MB in fp32, plus as much again for their gradient and a bf16 copy under autocast). Allocating and touching them
costs more than the head's matmul on a CPU (fresh pages fault in; glibc hands blocks over 32 MB straight back to the
kernel), and ``log_softmax`` + ``nll_loss`` walk them four more times in the backward pass. In chunks of a few
hundred rows every buffer stays small enough to be reused from the heap.

The gradient is exact, not approximated. For one token with logits z = W h (+ b), target y and softmax p:

    log p_y = z_y - logsumexp(z)        d log p_y / d z = e_y - p        d log p_y / d h = W^T (e_y - p)

Any loss built from per-token log-probs (SFT cross entropy, DPO/ORPO sequence sums, GRPO/PPO ratios) reaches the
head only through g_t = dL / d log p_t, a scalar per token. So when the head is frozen (every adapter method) the
forward pass computes the row vector d_t = W^T (e_y - p_t) while the chunk's softmax is at hand, and the backward
pass is just g_t * d_t: no logits are recomputed and none are kept. When the head trains (full fine-tuning, tied
embeddings with a trainable embedding), the backward pass recomputes each chunk's logits instead, because
dL/dW = sum_t g_t (e_y - p_t) h_t^T needs g_t.

Under autocast the matmuls run in the autocast dtype (as ``nn.Linear`` would) and the softmax in fp32 (as Hugging
Face's loss upcasts the logits).
"""

from __future__ import annotations

import torch
from torch import nn

CHUNK_ELEMENTS = 1 << 22  # logits per chunk: 4M (16 MB in fp32); amortises reading W once per chunk

_WORKSPACE: dict = {}  # the chunk buffers, kept between calls: re-faulting 16 MB of fresh pages costs ~10 ms


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    dev = t.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else t.dtype


def _buffers(rows: int, vocab: int, dtype: torch.dtype, device: torch.device):
    """(logits in the compute dtype, logits in fp32 or wider) buffers of ``rows`` x ``vocab``; one tensor if equal."""
    key = (rows, vocab, dtype, device)
    if key not in _WORKSPACE:
        _WORKSPACE.clear()  # one shape at a time: memory stays bounded by one chunk
        wide = torch.promote_types(dtype, torch.float32)
        zf = torch.empty(rows, vocab, dtype=wide, device=device)
        zb = zf if dtype == wide else torch.empty(rows, vocab, dtype=dtype, device=device)
        _WORKSPACE[key] = (zb, zf)
    return _WORKSPACE[key]


def _chunks(n_rows: int, vocab: int):
    step = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    return step, [(s, min(s + step, n_rows)) for s in range(0, n_rows, step)]


def _softmax_chunk(h_c, w, b, y_c, zb, zf):
    """Fill ``zf`` with the chunk's softmax (fp32, in place) and return log p of the targets (n,)."""
    n = len(y_c)
    zb, zf = zb[:n], zf[:n]
    torch.mm(h_c, w.t(), out=zb)  # (n, V) in the compute dtype
    if zf is not zb:
        zf.copy_(zb)
    if b is not None:
        zf.add_(b.to(zf.dtype))
    z_y = zf.gather(1, y_c.unsqueeze(1)).squeeze(1)
    m = zf.amax(1, keepdim=True)
    s = zf.sub_(m).exp_().sum(1, keepdim=True)
    zf.div_(s)
    return z_y - (m + s.log()).squeeze(1), zb, zf


class _HeadLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets):  # (N, H), (V, H), (V,) | None, (N,)
        dtype = _compute_dtype(hidden)
        head_trains = weight.requires_grad or (bias is not None and bias.requires_grad)
        wide = torch.promote_types(dtype, torch.float32)
        logps = torch.empty(len(targets), dtype=wide, device=hidden.device)
        d = (torch.empty(hidden.shape, dtype=wide, device=hidden.device)
             if ctx.needs_input_grad[0] and not head_trains else None)  # (N, H): d log p_t / d h_t
        with torch.autocast(hidden.device.type, enabled=False):  # casts are explicit below
            w, h_all = weight.to(dtype), hidden.to(dtype)
            step, spans = _chunks(len(targets), weight.shape[0])
            zb, zf = _buffers(step, weight.shape[0], dtype, hidden.device)
            for s, e in spans:
                logps[s:e], zb_c, p = _softmax_chunk(h_all[s:e], w, bias, targets[s:e], zb, zf)
                if d is not None:
                    p[torch.arange(e - s, device=p.device), targets[s:e]] -= 1.0  # p - e_y
                    if zb_c is not p:
                        zb_c.copy_(p)
                    d[s:e] = torch.mm(zb_c, w).neg_()  # W^T (e_y - p)
        ctx.dtype, ctx.head_trains = dtype, head_trains
        ctx.save_for_backward(*((hidden, weight, bias, targets) if head_trains else (d,)))
        return logps

    @staticmethod
    def backward(ctx, g):  # g: (N,) = dL / d log p_t
        if not ctx.head_trains:
            (d,) = ctx.saved_tensors
            return (None if d is None else g.unsqueeze(-1) * d), None, None, None
        with torch.autocast(g.device.type, enabled=False):
            return _backward_recompute(ctx, g, *ctx.saved_tensors)


def _backward_recompute(ctx, g, hidden, weight, bias, targets):
    """Trainable head: recompute each chunk's softmax, then dL/dz = g (e_y - p) gives dh, dW and db."""
    dtype, (V, H) = ctx.dtype, weight.shape
    w, h_all = weight.to(dtype), hidden.to(dtype)
    want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    want_b = bias is not None and ctx.needs_input_grad[2]
    wide = torch.promote_types(dtype, torch.float32)
    grad_h = torch.empty(hidden.shape, dtype=wide, device=hidden.device) if want_h else None
    grad_w = torch.zeros(V, H, dtype=wide, device=weight.device) if want_w else None
    gw_c = torch.empty(V, H, dtype=dtype, device=weight.device) if want_w and dtype != wide else grad_w
    grad_b = torch.zeros(V, dtype=wide, device=weight.device) if want_b else None
    step, spans = _chunks(len(targets), V)
    zb, zf = _buffers(step, V, dtype, hidden.device)
    for s, e in spans:
        _, zb_c, p = _softmax_chunk(h_all[s:e], w, bias, targets[s:e], zb, zf)
        p[torch.arange(e - s, device=p.device), targets[s:e]] -= 1.0
        gz = p.mul_(g[s:e].to(p.dtype).neg().unsqueeze(-1))  # dL/dz = g (e_y - p), (n, V) fp32
        if grad_b is not None:
            grad_b += gz.sum(0)
        if zb_c is not gz:
            zb_c.copy_(gz)
        if grad_h is not None:
            grad_h[s:e] = torch.mm(zb_c, w)
        if grad_w is not None:
            if gw_c is grad_w:
                grad_w.addmm_(zb_c.t(), h_all[s:e])
            else:
                grad_w += torch.mm(zb_c.t(), h_all[s:e], out=gw_c)
    out = lambda t, like: None if t is None else t.to(like.dtype)  # noqa: E731
    return out(grad_h, hidden), out(grad_w, weight), (out(grad_b, bias) if want_b else None), None


def fusable_head(head: nn.Module | None) -> bool:
    """A plain ``nn.Linear`` (not wrapped by an adapter, not quantised) can be fused with the softmax."""
    return type(head) is nn.Linear


def head_token_logps(head: nn.Linear, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets) under ``head`` for hidden states (N, H) and target ids (N,) -> (N,) fp32, differentiable."""
    if len(targets) == 0:
        return hidden.sum(-1) * 0.0  # keeps the graph (and DDP) intact
    return _HeadLogps.apply(hidden, head.weight, head.bias, targets)
