"""SAE codes over a cache or a live model, in text order, sparse, with the token and context behind every row.

    for codes in iter_codes(sae, "runs/acts"):           # or iter_codes(sae, ModelStream(model, hook, text))
        codes.latents, codes.values, codes.crow           # CSR rows: row i's nonzeros are [crow[i], crow[i+1])
        codes.token_ids, codes.contexts, codes.positions  # which token, which context, where in it
        codes.texts(tokenizer)                            # each row's token as text

Explore, matching and circle search all read codes this way, so none of them builds a [tokens, width] matrix or
its own encoding loop. Rows come in text order (contexts ascending), never shuffled, so "the context of row i" and
"the k tokens before it" are cheap to show.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

from saelab.activations.joined import JoinedSource
from saelab.activations.source import ActivationSource, open_source
from saelab.activations.store import ActivationBatch, ActivationStore
from saelab.activations.stream import ModelStream
from saelab.errors import HookError
from saelab.kernels.layout import CSRCodes, row_offsets

Source = str | Path | ActivationStore | ModelStream | ActivationSource


@dataclass
class Codes(CSRCodes):
    """Sparse codes of n token positions in the SAE's raw output units: the kernels' CSR codes (offsets, indices,
    values over `width` latents; len(), nnz, row_ids()) with the token behind every row."""

    token_ids: Tensor
    rows: Tensor
    contexts: Tensor
    positions: Tensor
    norms: Tensor | None = None
    """float [n]: each row's activation norm (raw units), when the codes were encoded from activations."""

    @property
    def crow(self) -> Tensor:
        """`offsets` under the name the analyses read."""
        return self.offsets

    @property
    def latents(self) -> Tensor:
        """`indices` under the name the analyses read."""
        return self.indices

    def csr(self) -> Tensor:
        """torch sparse CSR [n, width] (for sparse products such as codes_a.T @ codes_b)."""
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(self.offsets, self.indices, self.values, (len(self), self.width),
                                           check_invariants=False)

    def dense(self) -> Tensor:
        """float [n, width]; only for small n."""
        out = torch.zeros(len(self), self.width, dtype=self.values.dtype)
        out[self.row_ids(), self.indices] = self.values
        return out

    def texts(self, tokenizer) -> list[str]:
        """Each row's token decoded on its own (byte-level pieces of one character may read as U+FFFD)."""
        return tokenizer.batch_decode(self.token_ids.unsqueeze(1).tolist())


def sparse_rows(dense: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Dense codes [n, width] -> CSR (crow [n+1], latents [nnz], values [nnz]) of their nonzeros."""
    rows, latents = dense.nonzero(as_tuple=True)
    return row_offsets(rows, len(dense)), latents, dense[rows, latents]


def encode_sparse(sae, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """CSR codes of activations x [n, d_in] in raw units (TopK SAEs never form the dense [n, width] codes)."""
    if sae.cfg.input_scale != 1:
        raise ValueError("encode_sparse needs an SAE that reads raw activations; call sae.fold_input_scale() first")
    if hasattr(sae, "encode_topk"):
        indices, values = sae.encode_topk(x)
        keep = values > 0
        order = torch.argsort(indices.masked_fill(~keep, sae.cfg.width), dim=1)  # latents ascending, zeros last
        indices, values, keep = indices.gather(1, order), values.gather(1, order), keep.gather(1, order)
        return row_offsets(keep.nonzero(as_tuple=True)[0], len(x)), indices[keep], values[keep]
    return sparse_rows(sae.encode(x))


def iter_codes(sae, source: Source, *, hook: str | None = None, batch_size: int = 4096,
               device: str | torch.device | None = None, max_tokens: int | None = None,
               check_model: bool = True) -> Iterator[Codes]:
    """Encode every position of `source` with `sae`, in text order, batch by batch (CPU tensors out).

    source: a cache folder or an ActivationStore (all its rows, in order, whatever its shuffle), a ModelStream (its
    contexts in order) or another ActivationSource (its in_order()). hook: which hook to read (default: the SAE's
    cfg.hook_name, else the source's only hook).
    max_tokens: stop after this many positions. check_model: refuse a source of another model than the SAE's
    cfg.model_name (when both name one); turn off for SAEs whose model is named differently.
    """
    device = torch.device(device) if device is not None else sae.device
    batches, hook, model = _ordered_batches(source, batch_size, hook or sae.cfg.hook_name, sae)
    sae.check_hook(hook)
    if check_model and sae.cfg.model_name and model and sae.cfg.model_name != model:
        raise ValueError(f"the SAE was trained on {sae.cfg.model_name!r} activations but the source holds "
                         f"{model!r}'s; pass check_model=False if they are the same model under two names")
    sae = (sae.fold_input_scale() if sae.cfg.input_scale != 1 else sae).to(device).eval()
    done = 0
    for batch in batches:
        if max_tokens is not None:
            if done >= max_tokens:
                return
            batch = _head(batch, max_tokens - done)
        x = batch.acts[hook]
        if x.shape[-1] != sae.cfg.d_in:
            raise ValueError(f"the SAE reads d_in={sae.cfg.d_in} but {hook} has width {x.shape[-1]}: it was "
                             f"trained on another hook or model")
        with torch.no_grad():  # not around the yield: the caller's code between chunks keeps its own grad mode
            crow, latents, values = encode_sparse(sae, x.to(device))
        yield Codes(crow.cpu(), latents.cpu(), values.float().cpu(), sae.cfg.width, batch.token_ids,
                    batch.rows, batch.contexts, batch.positions, x.float().norm(dim=-1).cpu())
        done += len(batch)


def _ordered_batches(source: Source, batch_size: int, wanted: str, sae) -> tuple[Iterator[ActivationBatch], str, str]:
    """(batches in text order, the hook to read, the source's model name). A source given whole is read in order
    (every row once, whatever its shuffle), in its own batch size. A crosscoder reads its parts joined, from any
    source that holds them (JoinedSource.for_crosscoder)."""
    source = open_source(source, batch_size=batch_size)
    if sae.cfg.is_crosscoder and wanted not in source.hooks:
        source = JoinedSource.for_crosscoder(source, sae)
    where = f"the cache {source.path}" if isinstance(source, ActivationStore) else "the model stream"
    hook = _pick_hook(wanted, source.hooks, where)
    return source.in_order(hooks=[hook]), hook, source.model_name


def _pick_hook(hook: str, hooks: list[str], where: str) -> str:
    if hook and hook in hooks:
        return hook
    if not hook and len(hooks) == 1:
        return hooks[0]
    if hook:
        raise HookError(f"the SAE reads {hook!r} but {where} holds {', '.join(hooks)}; pass hook= to pick one "
                        f"(of the same model and width)")
    raise HookError(f"the SAE names no hook and {where} holds several ({', '.join(hooks)}); pass hook=")


def _head(batch: ActivationBatch, n: int) -> ActivationBatch:
    if len(batch) <= n:
        return batch
    return ActivationBatch({h: a[:n] for h, a in batch.acts.items()}, batch.token_ids[:n], batch.rows[:n],
                           batch.contexts[:n], batch.positions[:n])
