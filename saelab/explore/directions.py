"""What a latent's decoder direction does: the tokens it promotes and suppresses through the unembedding (the
logit-lens table W_dec W_U), and its nearest latents by decoder cosine. Both read only weights, so they are computed
for all latents in chunks, never as a full [width, vocab] or [width, width] matrix."""

from __future__ import annotations

import torch
from torch import Tensor


def unembedding(model) -> Tensor:
    """float [d_model, vocab] on the CPU: the model's unembedding W_U with the final norm's per-dimension gain folded
    in (a direction d changes the logits by about (d * gain) @ W_U up to the positive rms factor).

    The gain is read by passing a vector of ones through the final norm, which recovers an RMSNorm's scale whatever
    its convention (Llama's w, Gemma's 1 + w); a LayerNorm (which would map ones to zero) is left out.
    """
    W_U = model.bridge.W_U.detach().float().cpu()
    norm = getattr(model.bridge, "ln_final", None)
    if norm is not None:
        with torch.no_grad():
            gain = norm(torch.ones(1, 1, W_U.shape[0], dtype=model.bridge.W_U.dtype,
                                   device=model.bridge.W_U.device)).reshape(-1).float().cpu()
        if torch.isfinite(gain).all() and gain.abs().sum() > 0:
            W_U = W_U * gain[:, None]
    return W_U


def logit_effects(W_dec: Tensor, W_U: Tensor, k: int = 10, chunk: int = 512) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(top values, top token ids, bottom values, bottom token ids), each [width, k]: the tokens each decoder row
    raises and lowers most through W_U [d, vocab]."""
    if W_dec.shape[1] != W_U.shape[0]:
        raise ValueError(f"the SAE writes d={W_dec.shape[1]} but the model's unembedding reads d={W_U.shape[0]}: "
                         f"the SAE belongs to another model")
    k = min(k, W_U.shape[1])
    parts = []
    with torch.no_grad():
        for start in range(0, len(W_dec), chunk):
            logits = W_dec[start : start + chunk].float().cpu() @ W_U
            up, down = logits.topk(k, dim=1), logits.topk(k, dim=1, largest=False)
            parts.append((up.values, up.indices, down.values, down.indices))
    return tuple(torch.cat(column) for column in zip(*parts))


def logit_histogram(direction: Tensor, W_U: Tensor, bins: int = 40) -> tuple[list[float], list[int]]:
    """(edges, counts): the histogram of one decoder row's logit weights `direction @ W_U` over every token, in
    `bins` equal-width bins over [min, max]. One row at a time, as a card is read, so no [width, vocab] is held."""
    with torch.no_grad():
        logits = direction.float().cpu() @ W_U
    low, high = float(logits.min()), float(logits.max())
    if high <= low:
        high = low + 1e-6
    counts = torch.histc(logits, bins=bins, min=low, max=high)
    return torch.linspace(low, high, bins + 1).tolist(), counts.long().tolist()


def nearest_latents(W_dec: Tensor, k: int = 8, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """(cosines, latents), each [width, k]: every latent's k most similar other decoder rows."""
    W = W_dec.detach().float().cpu()
    W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    k = min(k, len(W) - 1)
    parts = []
    with torch.no_grad():
        for start in range(0, len(W), chunk):
            cosine = W[start : start + chunk] @ W.T
            rows = torch.arange(start, min(start + chunk, len(W)))
            cosine[rows - start, rows] = float("-inf")  # not itself
            best = cosine.topk(k, dim=1)
            parts.append((best.values, best.indices))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
