"""Linear and embedding layers whose parameters know how to load themselves from checkpoint tensors.

Every parameter carries `param.weight_loader(param, loaded, shard_id=None)`. Plain parameters are
replaced by the loaded tensor (assign-style: no second copy). Fused parameters (qkv, gate_up) are
allocated once, on the first shard's device and dtype, and filled shard by shard; they list the
shard ids they expect in `param.shard_ids` so the loader can check coverage.

Under tensor parallelism (models/parallel.py) each layer is built with this rank's share and its
loader cuts the rank's slice out of the full checkpoint tensor: column-parallel layers split their
output rows (q/k/v by heads, KV heads replicated when there are fewer than ranks), row-parallel
layers split their input columns and sum their outputs over the group, the embedding splits the
vocabulary. With one rank every slice is the whole tensor. A linear layer says where its rank's slice
of the checkpoint weight lies (`weight_part`); the quantized layers that replace it cut their own
tensors (packed int4, group scales) from the same parts.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kiln.core.errors import WeightMappingError
from kiln.kernels.dense_gemm import dense_linear
from kiln.models.parallel import all_reduce, rank_share, tensor_parallel


class LoadableModule(nn.Module):
    """A module whose parameters are created empty (meta-friendly) and filled by `weight_loader`."""

    def create_param(self, name: str, *shape: int, shard_ids: tuple[Hashable, ...] | None = None) -> None:
        """Register an uninitialised parameter (on the ambient device, e.g. meta) with its loader."""
        param = nn.Parameter(torch.empty(*shape), requires_grad=False)
        self._attach(name, param, shard_ids)

    def _attach(self, name: str, param: nn.Parameter, shard_ids: tuple[Hashable, ...] | None) -> None:
        param.weight_loader = self.weight_loader
        if shard_ids is not None:
            param.shard_ids = shard_ids
        setattr(self, name, param)

    def _param_name(self, param: nn.Parameter) -> str:
        for name, own in self._parameters.items():
            if own is param:
                return name
        raise WeightMappingError(f"parameter {tuple(param.shape)} is not owned by {type(self).__name__}")

    def shard_range(self, name: str, shard_id: Hashable) -> tuple[int, int]:
        """(offset, size) of one shard along dim 0 of a fused parameter."""
        raise WeightMappingError(f"{type(self).__name__}.{name} is not fused (shard {shard_id!r})")

    def rank_slice(self, name: str, loaded: torch.Tensor, shard_id: Hashable | None) -> torch.Tensor:
        """This tensor-parallel rank's part of a checkpoint tensor (all of it for unsplit layers)."""
        return loaded

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Hashable | None = None) -> None:
        """Load a full tensor (shard_id None) or one shard of a fused parameter."""
        name = self._param_name(param)
        loaded = self.rank_slice(name, loaded, shard_id)
        shard_ids = getattr(param, "shard_ids", None)
        if shard_id is None:
            if shard_ids is not None:
                raise WeightMappingError(f"fused parameter {name} needs a shard id, one of {shard_ids}")
            check_shape(loaded.shape, param.shape)
            self._attach(name, nn.Parameter(loaded, requires_grad=False), None)
            return
        if shard_ids is None or shard_id not in shard_ids:
            raise WeightMappingError(f"parameter {name} has no shard {shard_id!r}")
        offset, size = self.shard_range(name, shard_id)
        check_shape(loaded.shape, (size, *param.shape[1:]))
        if param.is_meta or param.device != loaded.device or param.dtype != loaded.dtype:
            # First shard: allocate the fused tensor once, where and as the shards arrive.
            fused = torch.empty(param.shape, dtype=loaded.dtype, device=loaded.device)
            self._attach(name, nn.Parameter(fused, requires_grad=False), shard_ids)
            param = getattr(self, name)
        param.data[offset : offset + size].copy_(loaded)


def rank_part(loaded: torch.Tensor, dim: int, start: int, length: int) -> torch.Tensor:
    """loaded[start : start + length] along `dim` for this rank; the whole tensor without parallelism."""
    if tensor_parallel().size == 1:
        return loaded  # the loader's shape check reports a wrong shape
    if loaded.dim() <= dim or loaded.shape[dim] < start + length:
        raise WeightMappingError(f"shape {tuple(loaded.shape)} is too small for this rank's slice")
    # A row-major copy of its own: a view would keep the whole checkpoint tensor alive on every rank,
    # and the quantized GEMMs read row-major weights.
    return loaded.narrow(dim, start, length).clone(memory_format=torch.contiguous_format)


def check_shape(got: torch.Size, expected: tuple[int, ...] | torch.Size) -> None:
    """Raise WeightMappingError unless a loaded tensor's shape is the expected one."""
    if tuple(got) != tuple(expected):
        raise WeightMappingError(f"shape {tuple(got)} does not match expected {tuple(expected)}")


@dataclass(frozen=True)
class RankPart:
    """This rank's slice of a checkpoint weight: `length` rows (dim 0) or columns (dim 1) from `start`."""

    dim: int
    start: int
    length: int


class LinearBase(LoadableModule):
    """y = x W^T (+ b) with W [sum(output_partition_sizes), input_size]."""

    def __init__(
        self,
        input_size: int,
        output_partition_sizes: list[int],
        bias: bool,
        shard_ids: tuple[Hashable, ...] | None = None,
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_partition_sizes = list(output_partition_sizes)
        self.output_size = sum(output_partition_sizes)
        self.create_param("weight", self.output_size, input_size, shard_ids=shard_ids)
        if bias:
            self.create_param("bias", self.output_size, shard_ids=shard_ids)
        else:
            self.bias = None

    def weight_part(self, shard_id: Hashable | None) -> RankPart | None:
        """Where this rank's slice of the checkpoint weight (of one shard) lies; None when not split.

        Quantized layers copy these parts (models/quantized_linear.py) to cut their own tensors.
        """
        return None

    def rank_slice(self, name: str, loaded: torch.Tensor, shard_id: Hashable | None) -> torch.Tensor:
        part = self.weight_part(shard_id)
        if part is None or (part.dim == 1 and name != "weight"):
            return loaded  # a row-parallel bias is added once, after the sum over ranks
        return rank_part(loaded, part.dim, part.start, part.length)

    def forward(self, x: torch.Tensor, gated: bool = False) -> torch.Tensor:
        """[num_tokens, input_size] -> [num_tokens, output_size].

        gated: x is [num_tokens, 2 * input_size], a gate/up projection's output, and the product takes
        silu(gate) * up (models.layers.silu_fused_into_next_product says when a caller may pass it).
        """
        return dense_linear(x, self.weight, self.bias, gated)


class ColumnParallelLinear(LinearBase):
    """Linear layer split along its output dimension under tensor parallelism (lm_head, ...)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__(input_size, [tensor_parallel().split(output_size, "output size")], bias)

    def weight_part(self, shard_id: Hashable | None) -> RankPart | None:
        return RankPart(0, tensor_parallel().rank * self.output_size, self.output_size)


class RowParallelLinear(LinearBase):
    """Linear layer split along its input dimension under tensor parallelism (o_proj, down_proj)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__(tensor_parallel().split(input_size, "input size"), [output_size], bias)

    def weight_part(self, shard_id: Hashable | None) -> RankPart | None:
        return RankPart(1, tensor_parallel().rank * self.input_size, self.input_size)

    def forward(self, x: torch.Tensor, gated: bool = False, reduce: bool = True) -> torch.Tensor:
        """[num_tokens, input_size / ranks] -> [num_tokens, output_size], summed over the ranks (gated: as
        LinearBase.forward, this rank's [gate | up] shards). reduce=False: this rank's share of the sum, for the
        next RMSNorm to sum (models.parallel.partial_sums_left_to_norms)."""
        if tensor_parallel().size == 1:
            return dense_linear(x, self.weight, self.bias, gated)  # one fused GEMM + bias, as without parallelism
        if not reduce:
            return rank_share(dense_linear(x, self.weight, None, gated), self.bias)
        out = all_reduce(dense_linear(x, self.weight, None, gated))
        return out if self.bias is None else out + self.bias


class MergedColumnParallelLinear(LinearBase):
    """Several column-parallel projections of one input fused into one GEMM; shards are 0, 1, ..."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False) -> None:
        sizes = [tensor_parallel().split(size, "output size") for size in output_sizes]
        super().__init__(input_size, sizes, bias, shard_ids=tuple(range(len(output_sizes))))

    def shard_range(self, name: str, shard_id: Hashable) -> tuple[int, int]:
        """(offset, size) of output block `shard_id`."""
        offset = sum(self.output_partition_sizes[:shard_id])
        return offset, self.output_partition_sizes[shard_id]

    def weight_part(self, shard_id: Hashable | None) -> RankPart | None:
        size = self.output_partition_sizes[shard_id]
        return RankPart(0, tensor_parallel().rank * size, size)


class QKVParallelLinear(LinearBase):
    """q, k and v projections fused into one GEMM; shards are "q", "k", "v".

    Under tensor parallelism each rank takes num_heads / ranks query heads and num_kv_heads / ranks KV
    heads; with fewer KV heads than ranks, each KV head is replicated on ranks / num_kv_heads ranks.
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False) -> None:
        tp = tensor_parallel()
        if num_kv_heads % tp.size and tp.size % num_kv_heads:  # neither split evenly nor replicated evenly
            raise ValueError(f"{num_kv_heads} KV heads cannot be spread over {tp.size} tensor-parallel ranks")
        self.kv_replicas = max(1, tp.size // num_kv_heads)
        self.q_size = tp.split(num_heads, "num_heads") * head_dim
        self.kv_size = max(1, num_kv_heads // tp.size) * head_dim
        sizes = [self.q_size, self.kv_size, self.kv_size]
        super().__init__(hidden_size, sizes, bias, shard_ids=("q", "k", "v"))

    def shard_range(self, name: str, shard_id: Hashable) -> tuple[int, int]:
        """(offset, size) of the q, k or v block."""
        offsets = {"q": 0, "k": self.q_size, "v": self.q_size + self.kv_size}
        return offsets[shard_id], self.q_size if shard_id == "q" else self.kv_size

    def weight_part(self, shard_id: Hashable | None) -> RankPart | None:
        rank = tensor_parallel().rank
        if shard_id == "q":
            return RankPart(0, rank * self.q_size, self.q_size)
        return RankPart(0, rank // self.kv_replicas * self.kv_size, self.kv_size)


class VocabEmbedding(LoadableModule):
    """Token embedding table [vocab_size, hidden_size], split along the vocabulary under TP.

    Each rank holds ceil(vocab / ranks) rows (the last rank's padded with zeros); a token's row comes
    from the rank that has it, the others contribute zeros to the sum.
    """

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        tp = tensor_parallel()
        self.vocab_size = vocab_size
        self.rows_per_rank = -(-vocab_size // tp.size)
        self.first_row = tp.rank * self.rows_per_rank
        self.create_param("weight", self.rows_per_rank, hidden_size)

    def rank_slice(self, name: str, loaded: torch.Tensor, shard_id: Hashable | None) -> torch.Tensor:
        if tensor_parallel().size == 1:
            return loaded
        part = loaded[self.first_row : self.first_row + self.rows_per_rank]
        if part.shape[0] < self.rows_per_rank:
            part = torch.cat([part, part.new_zeros(self.rows_per_rank - part.shape[0], part.shape[1])])
        return part

    def forward(self, input_ids: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        """[num_tokens] -> [num_tokens, hidden_size]. reduce=False under tensor parallelism: this rank's rows (zeros
        for the others' tokens), for the first RMSNorm to sum over the ranks."""
        if tensor_parallel().size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.first_row
        mine = (local >= 0) & (local < self.rows_per_rank)
        out = F.embedding(local.clamp(0, self.rows_per_rank - 1), self.weight) * mine.unsqueeze(-1)
        return all_reduce(out) if reduce else out
