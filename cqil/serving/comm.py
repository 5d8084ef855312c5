"""The collectives of the concurrent runtime: ``torch.distributed`` or shared memory between CPU ranks.

:class:`Communicator` runs them over a ``torch.distributed`` process group (gloo on CPU, NCCL on
GPU); :class:`SharedMemoryCommunicator`, for CPU ranks on one x86-64 host, moves the few kilobytes a
decode step exchanges through shared memory in microseconds where gloo's sockets take a fraction of a
millisecond. Either way every rank receives the same sums, bit for bit. :func:`share_weights` maps
replicated weights from one shared copy per host.
"""

from __future__ import annotations

import os
import platform
import socket
import time
import zlib
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

TRANSPORTS = ("auto", "torch", "shm")
DEFAULT_TIMEOUT = timedelta(minutes=10)


class Communicator:
    """The collectives a sharded group needs, over a ``torch.distributed`` process group.

    ``all_reduce_`` sums in place; ``all_gather`` returns every rank's tensor stacked in rank order;
    ``exchange`` sends a tensor to ``destinations`` and returns those of ``sources`` by rank. Every
    rank calls every collective in the same order (``exchange`` too, with empty lists where it has
    nothing to send or receive), with tensors of the same shape.
    """

    transport = "torch"

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized: call init_distributed() first")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, group=self.group)
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.new_empty((self.world_size, *tensor.shape))
        dist.all_gather(list(out.unbind(0)), tensor.contiguous(), group=self.group)
        return out

    def exchange(self, tensor: torch.Tensor, sources, destinations) -> dict[int, torch.Tensor]:
        tensor = tensor.contiguous()
        received = {k: torch.empty_like(tensor) for k in sources}
        ops = [dist.P2POp(dist.isend, tensor, self._global(k), self.group) for k in destinations]
        ops += [dist.P2POp(dist.irecv, buf, self._global(k), self.group) for k, buf in received.items()]
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        return received

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)


class SharedMemoryCommunicator(Communicator):
    """:class:`Communicator` whose collectives move data through shared memory (CPU ranks, one host).

    Every rank owns a slot per parity in one shared file; a collective writes the rank's tensor into
    its slot, publishes the call's sequence number in the rank's flag, and waits until every rank has
    published it, after which all slots of that call are readable. Two parities make the wait of
    call s+1 prove that every rank has finished reading call s before its slot is written again.
    The sums add the slots in rank order, so every rank computes bit-identical results.

    Sequencing relies on x86-64 ordering every store (the data before the flag); other machines use
    the plain :class:`Communicator`. The process group is used only to set up and grow the buffer.
    """

    transport = "shm"
    _FLAG_STRIDE = 8  # one 64-byte cache line per rank's flag

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        *,
        capacity_bytes: int = 1 << 20,
        timeout: timedelta = DEFAULT_TIMEOUT,
    ) -> None:
        super().__init__(group)
        if not shared_memory_usable(group):
            raise RuntimeError("shared-memory collectives need CPU ranks on one x86-64 host")
        self.timeout_s = timeout.total_seconds()
        self.capacity = 0
        self._map(max(int(capacity_bytes), 1 << 12))

    def _map(self, capacity: int) -> None:
        """(Re)create the shared buffer with ``capacity`` bytes per slot; collective."""
        capacity = -(-capacity // 64) * 64
        flags_bytes = self.world_size * self._FLAG_STRIDE * 8
        raw = map_shared(self, flags_bytes + 2 * self.world_size * capacity)
        self._flags = raw[:flags_bytes].view(torch.int64).numpy()  # numpy reads skip torch's dispatch
        self._slots = raw[flags_bytes:].view(2, self.world_size, capacity)
        self.capacity = capacity
        self._step = 0

    def _publish(self, tensor: torch.Tensor) -> torch.Tensor:
        """Write ``tensor`` into this rank's slot, wait for every rank; return the call's slots as bytes."""
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes > self.capacity:  # every rank sees the same shape, so all grow together
            self._map(max(nbytes, 2 * self.capacity))
        self._step += 1
        slots = self._slots[self._step % 2, :, :nbytes]
        slots[self.rank].view(tensor.dtype).copy_(tensor.reshape(-1))
        self._flags[self.rank * self._FLAG_STRIDE] = self._step
        self._wait_all(self._step)
        return slots

    def _wait_all(self, step: int) -> None:
        flags, stride = self._flags, self._FLAG_STRIDE
        deadline = None
        for k in range(self.world_size):
            spins = 0
            while flags[k * stride] < step:
                spins += 1
                if spins % 256 == 0:
                    # Give the core away: on a busy machine the rank being waited for may need it.
                    os.sched_yield()
                    if spins % (1 << 16) == 0:
                        now = time.monotonic()
                        deadline = deadline or now + self.timeout_s
                        if now > deadline:
                            raise TimeoutError(
                                f"rank {self.rank} waited more than {self.timeout_s:.0f} s for rank {k} "
                                f"at collective {step}"
                            )

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        parts = self._publish(tensor).view(tensor.dtype)
        out = tensor.view(-1) if tensor.is_contiguous() else torch.empty_like(tensor).view(-1)
        if self.world_size == 1:
            out.copy_(parts[0])
        else:
            torch.add(parts[0], parts[1], out=out)
        for k in range(2, self.world_size):
            out.add_(parts[k])
        if out.data_ptr() != tensor.data_ptr():
            tensor.copy_(out.view(tensor.shape))
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        parts = self._publish(tensor).view(tensor.dtype)
        return parts.reshape(self.world_size, *tensor.shape).clone()

    def exchange(self, tensor: torch.Tensor, sources, destinations) -> dict[int, torch.Tensor]:
        # Every rank publishes (a barrier of one flag per rank); only the sources' slots are read.
        parts = self._publish(tensor).view(tensor.dtype)
        return {k: parts[k].view(tensor.shape).clone() for k in sources}

    def barrier(self) -> None:
        self._step += 1
        self._flags[self.rank * self._FLAG_STRIDE] = self._step
        self._wait_all(self._step)


def shared_memory_usable(group: dist.ProcessGroup | None = None) -> bool:
    """Whether every rank of ``group`` runs on this host, on CPU tensors, on x86-64; collective."""
    if dist.get_backend(group) != "gloo" or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if not os.path.isdir("/dev/shm"):
        return False
    boot_id = ""
    if os.path.isfile("/proc/sys/kernel/random/boot_id"):
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot_id = f.read().strip()
    host = zlib.crc32(f"{socket.gethostname()}/{boot_id}".encode())
    mine = torch.tensor([host], dtype=torch.int64)
    hosts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(hosts, mine, group=group)
    return all(int(h) == host for h in hosts)


def map_shared(comm: Communicator, nbytes: int, write=None) -> torch.Tensor:
    """``nbytes`` of memory that every rank of ``comm`` maps from one file, as a uint8 tensor; collective.

    ``write(buffer)`` fills it on rank 0 before any other rank returns. The file is unlinked once all
    ranks have mapped it, so nothing is left behind when they exit.
    """
    shm = os.statvfs("/dev/shm")
    if shm.f_bavail * shm.f_frsize < nbytes:  # tmpfs allocates on write: running out would be a SIGBUS
        raise RuntimeError(f"/dev/shm has less than the {nbytes / 2**20:.0f} MiB free that the ranks share")
    nonce = torch.tensor([int.from_bytes(os.urandom(7), "little")], dtype=torch.int64)
    dist.broadcast(nonce, src=comm._global(0), group=comm.group)
    path = f"/dev/shm/cqil-{nonce.item():x}"
    if comm.rank == 0:
        with open(path, "wb") as f:
            f.truncate(nbytes)
    dist.barrier(group=comm.group)
    raw = torch.empty(0, dtype=torch.uint8).set_(
        torch.UntypedStorage.from_file(path, shared=True, nbytes=nbytes)
    )
    if comm.rank == 0 and write is not None:
        write(raw)
    dist.barrier(group=comm.group)
    if comm.rank == 0:
        os.unlink(path)  # the mappings stay
    return raw


@torch.no_grad()
def share_weights(params: list[nn.Parameter], comm: Communicator) -> int:
    """Make ``params`` one copy in memory shared by every rank on this host, rank 0's; return its bytes.

    Every rank must pass parameters of the same shapes and dtypes in the same order and hold the same
    values (they load the same model). Ranks that compute the same layers at the same time then read
    the same cache lines instead of each streaming its own copy through the memory bus, which is what
    limits a CPU's decode speed; private copies make two ranks as slow as one.
    """
    params = list({id(p): p for p in params}.values())  # tied weights once
    offsets, total = [], 0
    for p in params:
        offsets.append(total)
        total += -(-p.numel() * p.element_size() // 64) * 64
    if total == 0:
        return 0

    def write(raw: torch.Tensor) -> None:
        for p, start in zip(params, offsets, strict=True):
            nbytes = p.numel() * p.element_size()
            raw[start : start + nbytes].view(p.dtype).copy_(p.detach().reshape(-1))

    raw = map_shared(comm, total, write)
    for p, start in zip(params, offsets, strict=True):
        p.data = raw[start : start + p.numel() * p.element_size()].view(p.dtype).view(p.shape)
    return total


def make_communicator(
    transport: str = "auto", group: dist.ProcessGroup | None = None, *, timeout: timedelta = DEFAULT_TIMEOUT
) -> Communicator:
    """A communicator: ``"torch"`` (``torch.distributed``), ``"shm"`` (shared memory) or ``"auto"``.

    ``"auto"`` picks shared memory where every rank is a CPU process on this x86-64 host.
    """
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {', '.join(map(repr, TRANSPORTS))}; got {transport!r}")
    if transport == "shm" or (transport == "auto" and shared_memory_usable(group)):
        return SharedMemoryCommunicator(group, timeout=timeout)
    return Communicator(group)


def init_distributed(device: torch.device | str = "cpu", *, timeout: timedelta = DEFAULT_TIMEOUT) -> None:
    """Join the process group ``torchrun`` describes in the environment: NCCL for CUDA, gloo otherwise."""
    if dist.is_initialized():
        return
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timeout)
