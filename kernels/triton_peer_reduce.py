"""Tensor-parallel all-reduce fused with the next residual add and RMSNorm, over peer GPU memory (NVLink).

At batch 1 a tensor-parallel decode step of the Llama-3-8B shape runs 64 all-reduces of 8 KB. With NCCL
each cost ~6.8 µs, plus ~2.8 µs of idle GPU around it (an NCCL kernel cannot be launched early, as
kernels/pdl.py launches ours), plus the add + RMSNorm kernel after it (~2 µs). This kernel does all three.

Each rank pushes its partial sum straight into every peer's symmetric buffer (`models.peer_all_reduce`), then
raises a flag in the peer's memory; it waits for every peer's flag in its own memory, sums the partials in rank
order (so every rank computes the same bits), adds the residual and normalises. One program per token row;
programs do not wait for each other, only for the same row's program on the other ranks.

Flags carry a per-row call count (`epoch`), not a 0/1 that must be reset: a kernel replayed from a CUDA graph
cannot be handed a new value by the host. While a rank waits in call e, a peer's flag for it holds e - 1 (not
yet), e, or e + 1 (the peer finished call e and already pushed call e + 1). So "not yet" is exactly e - 1,
which stays true when the int32 count wraps. Data slots alternate with the count's parity: a rank writes
slot e % 2 again only in call e + 2, which it starts after every peer raised its flag for call e + 1, by
then done reading call e's slot.

KILN_PEER_REDUCE=lamport (16-bit activations; not yet run on a GPU) drops the flags: the data is its own
signal. Slots start as -0.0 in every element, which a pushed row never holds (its -0.0 become +0.0); the
reader polls its slot until no element is -0.0, then writes -0.0 back for the call three later (slots rotate
over three). That saves the system-scope fence that must drain the pushes before a flag can be raised, and
the flag's own trip.

A peer that never comes (a dead process) must not leave this kernel spinning: past `timeout_ns` (the group's
collective timeout, as NCCL's) the kernel traps, which fails the CUDA context with an error. A spinning kernel
would also hold up the process's exit: NCCL's abort cannot stop it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.kernels.pdl import use_pdl, wait_for_previous_kernel
from kiln.kernels.triton_fused_ops import add_rms_norm_row


@triton.jit
def _raise_flags(flag_addresses, epoch):
    """Store `epoch` at each address with release semantics at system scope (after this thread's writes)."""
    return tl.inline_asm_elementwise(
        "st.release.sys.global.u32 [$1], $2;\nmov.u32 $0, 0;",
        "=r,l,r",
        [flag_addresses, epoch],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _wait_for_flags(flag_addresses, previous_epoch, deadline):
    """Spin (acquire, system scope) until each flag no longer holds `previous_epoch`; trap past `deadline` ns."""
    return tl.inline_asm_elementwise(
        """{
        .reg .u32 %seen;
        .reg .u64 %now;
        .reg .pred %waiting, %late;
        spin:
        ld.acquire.sys.global.u32 %seen, [$1];
        setp.eq.u32 %waiting, %seen, $2;
        @!%waiting bra arrived;
        mov.u64 %now, %globaltimer;
        setp.gt.u64 %late, %now, $3;
        @%late trap;
        bra spin;
        arrived:
        mov.u32 $0, %seen;
        }""",
        "=r,l,r,l",
        [flag_addresses, previous_epoch, deadline],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _trap_after(deadline):
    """Trap (a CUDA error) once the global timer has passed `deadline` ns."""
    tl.inline_asm_elementwise(
        """{
        .reg .u64 %now;
        .reg .pred %late;
        mov.u64 %now, %globaltimer;
        setp.gt.u64 %late, %now, $1;
        @%late trap;
        mov.u32 $0, 0;
        }""",
        "=r,l",
        [deadline],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _unwritten(values, mask):
    """How many elements of a 16-bit row still hold -0.0 (0x8000: not yet written by the peer)."""
    return tl.sum(((values.to(tl.int16, bitcast=True) == -32768) & mask).to(tl.int32), axis=0)


@triton.jit
def _wait_for_row(pushed, mask, deadline):
    """The row at `pushed`, once every element holds a peer's value (volatile loads: never a cached copy)."""
    values = tl.load(pushed, mask=mask, other=1.0, volatile=True)
    while _unwritten(values, mask) > 0:
        _trap_after(deadline)
        values = tl.load(pushed, mask=mask, other=1.0, volatile=True)
    return values


@triton.jit
def _data_pointer(data_addresses_ptr, rank, dtype: tl.constexpr):
    """Rank `rank`'s data buffer as a pointer to `dtype`; symmetric buffers are 16-byte aligned (vector stores)."""
    return tl.multiple_of(tl.load(data_addresses_ptr + rank).to(tl.pointer_type(dtype)), 16)


@triton.jit
def _peer_reduce_add_rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    new_residual_ptr,
    data_addresses_ptr,  # [WORLD] int64: each rank's data buffer (slots below)
    flag_addresses_ptr,  # [WORLD] int64: each rank's flags, [WORLD, max_rows] int32 (not read with LAMPORT)
    epochs_ptr,  # [max_rows] int32: per row, this rank's call count (flags) or its last slot (LAMPORT)
    hidden,
    max_rows,
    eps,
    timeout_ns,
    stride_x,
    stride_r,
    stride_o,
    stride_nr,
    RANK: tl.constexpr,
    WORLD: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
    LAMPORT: tl.constexpr,
):
    deadline = tl.extra.cuda.globaltimer() + timeout_ns
    wait_for_previous_kernel(USE_PDL)  # PDL: nothing read or written before (kernels/pdl.py)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    # LAMPORT: data_addresses_ptr holds the -0.0-filled buffers, [3, WORLD, max_rows, hidden]; epochs_ptr each
    # row's last slot (0, 1, 2). Otherwise the flagged buffers, [2, WORLD, max_rows, hidden], and call counts.
    count = tl.load(epochs_ptr + row) + 1
    slot = ((count % 3) if LAMPORT else (count & 1)).to(tl.int64)
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + cols, mask=mask, other=0.0)
    if LAMPORT:
        x = tl.where(x == 0.0, 0.0, x).to(x.dtype)  # -0.0 (and +0.0) as +0.0: -0.0 means "not yet written"
    mine = ((slot * WORLD + RANK) * max_rows + row) * hidden  # where this rank's row lands on every peer
    for peer in tl.static_range(WORLD):
        if peer != RANK:
            tl.store(_data_pointer(data_addresses_ptr, peer, x_ptr.dtype.element_ty) + mine + cols, x, mask=mask)
    if not LAMPORT:
        _exchange_flags(flag_addresses_ptr, count, row, max_rows, deadline, RANK, WORLD)
    own_data = _data_pointer(data_addresses_ptr, RANK, x_ptr.dtype.element_ty)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for source in tl.static_range(WORLD):  # rank order on every rank: the same sum to the bit everywhere
        if source == RANK:
            total += x.to(tl.float32)
        else:
            pushed = own_data + ((slot * WORLD + source) * max_rows + row) * hidden + cols
            if LAMPORT:
                total += _wait_for_row(pushed, mask, deadline).to(tl.float32)
                # -0.0 again, for the call three later (as bits: a literal -0.0 is folded to 0.0)
                tl.store(pushed, tl.full([BLOCK], -32768, tl.int16).to(x.dtype, bitcast=True), mask=mask)
            else:
                total += tl.load(pushed, mask=mask, other=0.0).to(tl.float32)  # after the acquire: the peer's write
    tl.store(epochs_ptr + row, slot.to(tl.int32) if LAMPORT else count)
    reduced = total.to(x_ptr.dtype.element_ty)  # rounded once, as NCCL's sum of two ranks
    add_rms_norm_row(
        reduced, row.to(tl.int64), cols, mask, residual_ptr, weight_ptr, out_ptr, new_residual_ptr,
        hidden, eps, stride_r, stride_o, stride_nr, HAS_RESIDUAL, True,
    )  # fmt: skip


@triton.jit
def _exchange_flags(flag_addresses_ptr, count, row, max_rows, deadline, RANK: tl.constexpr, WORLD: tl.constexpr):
    """Raise this row's flag (`count`) in every peer's memory after the pushes, then wait for theirs in ours."""
    tl.debug_barrier()  # every thread's pushes happen before any thread's flag (release is cumulative)
    peers = tl.arange(0, WORLD)
    peer_flags = tl.load(flag_addresses_ptr + peers).to(tl.pointer_type(tl.int32))
    _raise_flags(peer_flags + RANK * max_rows + row, tl.full([WORLD], 0, tl.int32) + count)
    own_flags = tl.load(flag_addresses_ptr + RANK).to(tl.pointer_type(tl.int32))
    _wait_for_flags(own_flags + peers * max_rows + row, tl.full([WORLD], 0, tl.int32) + (count - 1), deadline)
    tl.debug_barrier()


def peer_reduce_add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    peers,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(sum over ranks of x + residual) * weight, that sum + residual): x [rows, hidden] is this rank's
    partial sum, rows <= peers.max_rows; `peers` is a models.peer_all_reduce.PeerBuffers."""
    rows, hidden = x.shape
    out = torch.empty_like(x)
    new_residual = torch.empty_like(x)
    r2d = residual if residual is not None else x  # not read without a residual
    block = triton.next_power_of_2(hidden)
    pdl = use_pdl(x.device)
    lamport = peers.lamport_addresses is not None and x.element_size() == 2
    data, counts = (peers.lamport_addresses, peers.lamport_slots) if lamport else (peers.data_addresses, peers.epochs)
    _peer_reduce_add_rms_norm_kernel[(rows,)](
        x, r2d, weight, out, new_residual,
        data, peers.flag_addresses, counts,
        hidden, peers.max_rows, eps, peers.timeout_ns,
        x.stride(0), r2d.stride(0), hidden, hidden,
        RANK=peers.rank, WORLD=peers.world, HAS_RESIDUAL=residual is not None, BLOCK=block, USE_PDL=pdl,
        LAMPORT=lamport, num_warps=min(max(block // 512, 1), 16), launch_pdl=pdl,
    )  # fmt: skip
    return out, new_residual
