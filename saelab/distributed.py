"""The process group, and the few collectives saelab needs, in one place (torch.distributed underneath).

`torchrun --nproc_per_node N -m saelab ...` sets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; `init()` joins that
group (NCCL when the work is on CUDA, gloo on the CPU) with a timeout, so a rank that dies or hangs makes the others
stop with DistributedError instead of waiting for ever. Everything else talks to a `World`: its rank and size, and
reductions that are the identity in a single process, so the trainer has one code path.
"""

from __future__ import annotations

import atexit
import datetime
import hashlib
import json
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from saelab.errors import SaelabError

TIMEOUT_ENV = "SAELAB_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600
"""How long a collective waits for the other ranks (a checkpoint write on rank 0 must fit in it)."""


class DistributedError(SaelabError):
    """Another rank failed, hung, or runs a different configuration."""


def _failed(error: Exception, rank: int) -> DistributedError:
    return DistributedError(
        f"rank {rank}: the other ranks stopped answering ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
        "one of them was killed or failed (see its own error above). Rerun the same command: training resumes from "
        "the last checkpoint, caching from the last shard written, with the same or another number of processes")


@dataclass(frozen=True)
class World:
    """This process's place among `size` ranks; every method is a no-op (or the identity) when size is 1."""

    rank: int = 0
    size: int = 1

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, logs, saved SAEs and manifests."""
        return self.rank == 0

    def _run(self, collective, *args, **kwargs):
        try:
            return collective(*args, **kwargs)
        except (RuntimeError, dist.DistBackendError) as error:
            raise _failed(error, self.rank) from None

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over ranks (a new tensor; the input is left alone)."""
        if not self.distributed:
            return tensor
        out = tensor.detach().clone().contiguous()
        self._run(dist.all_reduce, out)
        return out

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean over ranks: with equal shares of a batch, the mean of per-rank means is the batch mean."""
        return tensor if not self.distributed else self.sum(tensor) / self.size

    def any(self, mask: torch.Tensor) -> torch.Tensor:
        """Element-wise OR over ranks of a bool tensor (e.g. which latents fired anywhere in the batch)."""
        if not self.distributed:
            return mask
        out = mask.to(torch.uint8).contiguous()
        self._run(dist.all_reduce, out, op=dist.ReduceOp.MAX)
        return out.bool()

    def all(self, flag: bool) -> bool:
        """True when `flag` is true on every rank (so all ranks take the same branch)."""
        if not self.distributed:
            return flag
        out = torch.tensor([int(flag)], dtype=torch.int64, device=self.device)
        self._run(dist.all_reduce, out, op=dist.ReduceOp.MIN)
        return bool(out.item())

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Equal-shaped tensors of every rank, concatenated along dim 0 in rank order (the whole batch again)."""
        if not self.distributed:
            return tensor
        local = tensor.contiguous()
        parts = [torch.empty_like(local) for _ in range(self.size)]
        self._run(dist.all_gather, parts, local)
        return torch.cat(parts)

    def gather_rows(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `tensor`, in rank order, when their first dimensions differ (padded, sent, trimmed)."""
        if not self.distributed:
            return [tensor]
        counts = self.gather(torch.tensor([len(tensor)], device=tensor.device)).tolist()
        padded = tensor.new_zeros((max(max(counts), 1), *tensor.shape[1:]))
        padded[: len(tensor)] = tensor
        parts = self.gather(padded).split(len(padded))
        return [part[:n] for part, n in zip(parts, counts)]

    def gather_json(self, value) -> list:
        """Every rank's JSON-able `value`, in rank order (small things: log records, verdicts)."""
        if not self.distributed:
            return [value]
        data = torch.tensor(list(json.dumps(value).encode()), dtype=torch.uint8, device=self.device)
        return [json.loads(bytes(part.cpu().tolist())) for part in self.gather_rows(data)]

    def broadcast_json(self, value, src: int = 0):
        """Rank `src`'s JSON-able `value` (the others pass anything, e.g. None)."""
        if not self.distributed:
            return value
        data = json.dumps(value).encode() if self.rank == src else b""
        length = self.broadcast(torch.tensor([len(data)], device=self.device), src)
        buffer = torch.zeros(int(length.item()), dtype=torch.uint8, device=self.device)
        if self.rank == src:
            buffer.copy_(torch.tensor(list(data), dtype=torch.uint8))
        return json.loads(bytes(self.broadcast(buffer, src).cpu().tolist()))

    def broadcast_state(self, meta, tensors: dict[str, torch.Tensor] | None, src: int):
        """Rank `src`'s (JSON-able meta, named tensors) on every rank (e.g. the state of an SAE that rank trains)."""
        if not self.distributed:
            return meta, tensors
        header = None
        if self.rank == src:
            header = {"meta": meta, "tensors": {name: [list(t.shape), str(t.dtype).removeprefix("torch.")]
                                                for name, t in tensors.items()}}
        header = self.broadcast_json(header, src)
        out = {}
        for name, (shape, dtype) in header["tensors"].items():
            out[name] = (tensors[name].detach().to(self.device).contiguous() if self.rank == src else
                         torch.empty(shape, dtype=getattr(torch, dtype), device=self.device))
            self.broadcast(out[name], src)
        return header["meta"], out

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """`tensor` made equal to rank `src`'s, in place."""
        if self.distributed:
            self._run(dist.broadcast, tensor, src)
        return tensor

    def average_grads(self, params: list[torch.Tensor]) -> None:
        """Replace each parameter's gradient by its mean over ranks, in one all-reduce (a missing one counts as 0)."""
        if not self.distributed:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self.sum(torch.cat([g.reshape(-1) for g in grads])) / self.size
        offset = 0
        for param, grad in zip(params, grads):
            if param.grad is None:
                param.grad = grad
            param.grad.copy_(flat[offset : offset + grad.numel()].view(grad.shape))
            offset += grad.numel()

    def main_first(self, work, what: str):
        """work() on rank 0 alone (taking a folder's lock, opening a run): the others wait, and stop with an error
        naming `what` when it failed on rank 0, rather than wait for it in a collective until the timeout."""
        if not self.distributed:
            return work()
        result = error = None
        if self.main:
            try:
                result = work()
            except BaseException as failure:  # noqa: B036 - re-raised below, after telling the others
                error = failure
        ok = self.all(error is None)
        if error is not None:
            raise error
        if not ok:
            raise DistributedError(f"rank {self.rank}: rank 0 could not {what} (see its error); nothing was written")
        return result

    def barrier(self) -> None:
        if self.distributed:
            self._run(dist.barrier)

    def check_same(self, value, what: str) -> None:
        """Refuse to go on when ranks disagree about `value` (any JSON-able setting): they would train different
        runs, or hang in mismatched collectives."""
        if not self.distributed:
            return
        digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).digest()
        mine = torch.tensor([int.from_bytes(digest[:7], "big")], dtype=torch.int64, device=self.device)
        every = self.gather(mine).tolist()
        if len(set(every)) > 1:
            odd = [rank for rank, h in enumerate(every) if h != every[0]]
            raise DistributedError(f"rank {self.rank}: the ranks were started with different {what} (rank(s) "
                                   f"{', '.join(map(str, odd))} differ from rank 0); start every rank with the same "
                                   "command, files and settings")

    @property
    def device(self) -> torch.device:
        """Where this rank's collectives exchange small tensors (CUDA under NCCL, which cannot send CPU tensors)."""
        if self.distributed and dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


SINGLE = World()


def timeout_s() -> float:
    value = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(value)
    except ValueError:
        raise DistributedError(f"{TIMEOUT_ENV}={value!r} is not a number of seconds") from None
    if not seconds > 0:
        raise DistributedError(f"{TIMEOUT_ENV} must be positive, got {value!r}")
    return seconds


def launched() -> bool:
    """Whether this process was started as one of several ranks (torchrun, or the same variables by hand)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str = "cpu") -> World:
    """Join the process group torchrun described (once per process), or the single-process World without one.

    device: where the work runs; "cuda" selects NCCL and this rank's GPU (LOCAL_RANK), anything else gloo.
    """
    if dist.is_available() and dist.is_initialized():
        return current()
    if not launched():
        return SINGLE
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise DistributedError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set: start the "
                               "ranks with torchrun (torchrun --nproc_per_node N -m saelab ...)")
    cuda = str(device).startswith("cuda")
    if torch.cuda.is_available():  # "cuda" then means this rank's own GPU, whatever the backend
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # leave the group while the interpreter is still whole: gloo's threads can abort its shutdown otherwise
    atexit.register(finish)
    try:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s()))
    except (RuntimeError, ValueError) as error:  # a rendezvous that times out, or a port already taken
        raise DistributedError(f"could not join the process group at {os.environ['MASTER_ADDR']}:"
                               f"{os.environ['MASTER_PORT']} as rank {os.environ['RANK']} of "
                               f"{os.environ['WORLD_SIZE']}: {error}") from None
    return current()


def current() -> World:
    """The World of the process group already joined (SINGLE when there is none)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return SINGLE


def local_device(device: str, world: World) -> str:
    """Each rank's own GPU under torchrun: plain "cuda" becomes cuda:<LOCAL_RANK>; any other device is kept."""
    if world.distributed and device == "cuda":
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


def finish() -> None:
    """Leave the process group (at the end of a command) so the next one can start cleanly."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
