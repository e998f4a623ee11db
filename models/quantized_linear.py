"""Linear layers that run ModelOpt-quantized checkpoints (FP8 W8A8, INT4 W4A16).

The layers hold the tensors exactly as ModelOpt exports them (see kiln.quantize.modelopt_quantize for
the layout) and multiply through `kernels.quantized_gemm`: FP8 tensor cores and a Triton W4A16 GEMM on
GPUs, the fp32 reference (which also rounds the activation to E4M3 with its static `input_scale`, as
the W8A8 GEMM must) elsewhere.

Fused layers (qkv, gate_up) load one checkpoint tensor per shard, and ModelOpt gives each shard its
own per-tensor FP8 `weight_scale`. We keep one scale per shard and never requantize: requantizing to
the largest scale (vLLM's choice) rounds the fp8 weights a second time. Per-shard scales expand to a
per-output-channel scale vector, which `torch._scaled_mm` takes as a row-wise scale on GPU. The
shards' `input_scale` (one activation, so ModelOpt writes equal values) is reduced with max.

Under tensor parallelism each layer cuts its rank's slice from the checkpoint tensors where the layer
it replaces would (`LinearBase.weight_part`). Column-parallel (output rows): the FP8 weight's rows,
the int4 weight's packed rows (out / 2: the rank's output count must be even) and the scale rows; the
per-tensor FP8 scales and the AWQ pre_quant_scale [in] stay whole. Row-parallel (input columns): the
weight's columns, the int4 scale's columns by in / group (the rank's inputs must be whole groups) and
the pre_quant_scale; the per-tensor FP8 scales stay whole, and the outputs are summed over the ranks.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch
from torch import nn

from kiln.core.errors import ConfigError, WeightMappingError
from kiln.kernels.quantized_gemm import (
    dequantize_int4,
    fp8_linear,
    int4_linear,
    quantize_fp8_reference,
    silu_and_mul_rows,
)
from kiln.models.linear import LinearBase, LoadableModule, RankPart, check_shape, rank_part
from kiln.models.parallel import all_reduce, rank_share, tensor_parallel


def fake_quant_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Round x to E4M3 under a per-tensor scale and back (what an FP8 activation or KV cache sees)."""
    return (quantize_fp8_reference(x, scale).float() * scale).to(x.dtype)


class QuantizedLinear(LoadableModule):
    """Base of the quantized layers: shards and rank parts copied from the layer it replaces, bias unquantized."""

    def __init__(
        self,
        input_size: int,
        output_partition_sizes: list[int],
        shards: dict | None,
        bias: bool,
        parts: dict[Hashable, RankPart] | None = None,
    ) -> None:
        super().__init__()
        tp = tensor_parallel()
        self.input_size = input_size  # this rank's
        self.output_partition_sizes = list(output_partition_sizes)  # this rank's
        self.output_size = sum(output_partition_sizes)
        self.shards = shards  # shard id -> (row offset, rows); None when not fused
        self.shard_ids = tuple(shards) if shards else None
        self.parts = dict(parts or {})  # shard id (None when not fused) -> this rank's part; {}: not split
        split_input = any(part.dim == 1 for part in self.parts.values())
        self.checkpoint_input_size = input_size * (tp.size if split_input else 1)
        self.reduce_output = split_input and tp.size > 1  # row-parallel: partial sums over the ranks
        if bias:
            self.create_param("bias", self.output_size, shard_ids=self.shard_ids)
        else:
            self.bias = None

    @classmethod
    def like(cls, base: LinearBase) -> QuantizedLinear:
        """A quantized layer of the same shape and shards as `base` (built on the ambient device)."""
        shard_ids = getattr(base.weight, "shard_ids", None)
        shards = {sid: base.shard_range("weight", sid) for sid in shard_ids} if shard_ids else None
        parts = {sid: base.weight_part(sid) for sid in shard_ids or (None,)}
        parts = {sid: part for sid, part in parts.items() if part is not None}
        return cls(base.input_size, base.output_partition_sizes, shards, base.bias is not None, parts)

    def create_quant_param(self, name: str, *shape: int) -> None:
        """A parameter loaded with its checkpoint dtype (fp8, uint8, fp32 scales), never cast."""
        self.keep_dtype_names = getattr(self, "keep_dtype_names", set()) | {name}
        self.create_param(name, *shape, shard_ids=self.shard_ids)

    def _attach(self, name: str, param: nn.Parameter, shard_ids: tuple[Hashable, ...] | None) -> None:
        # Loading re-attaches parameters; the replacement must still tell the loader not to cast.
        param.keep_dtype = name in getattr(self, "keep_dtype_names", ())
        super()._attach(name, param, shard_ids)

    def shard_range(self, name: str, shard_id: Hashable) -> tuple[int, int]:
        """(offset, size) along dim 0 of one shard of a fused parameter."""
        return self.shards[shard_id]

    def rank_slice(self, name: str, loaded: torch.Tensor, shard_id: Hashable | None) -> torch.Tensor:
        """This rank's part of checkpoint tensor `name` (of one shard)."""
        part = self.parts.get(shard_id)
        own = None if part is None else self.tensor_part(name, part, loaded)
        return loaded if own is None else rank_part(loaded, own.dim, own.start, own.length)

    def tensor_part(self, name: str, part: RankPart, loaded: torch.Tensor) -> RankPart | None:
        """Where tensor `name`'s slice lies given the weight's `part`; None when every rank keeps it whole."""
        if name == "bias":
            return part if part.dim == 0 else None  # a row-parallel bias is added once, after the sum
        return part

    def forward(self, x: torch.Tensor, gated: bool = False, reduce: bool = True) -> torch.Tensor:
        """[num_tokens, in] -> [num_tokens, out]; a row-parallel layer's partial outputs summed over the ranks.

        gated: x is [num_tokens, 2 * in], [gate | up], and the product takes silu(gate) * up (LinearBase.forward).
        reduce=False: a row-parallel layer returns this rank's share of the sum, for the next RMSNorm to sum.
        """
        if not self.reduce_output:
            return self.matmul(x, self.bias, gated)
        if not reduce:
            return rank_share(self.matmul(x, None, gated), self.bias)
        out = all_reduce(self.matmul(x, None, gated))
        return out if self.bias is None else out + self.bias

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None, gated: bool = False) -> torch.Tensor:
        """This rank's x W^T (+ bias)."""
        raise NotImplementedError


class Fp8Linear(QuantizedLinear):
    """W8A8 FP8: weight E4M3 [out, in], one weight_scale and input_scale per shard (fp32)."""

    def __init__(
        self,
        input_size: int,
        output_partition_sizes: list[int],
        shards: dict | None,
        bias: bool,
        parts: dict[Hashable, RankPart] | None = None,
    ) -> None:
        super().__init__(input_size, output_partition_sizes, shards, bias, parts)
        num_shards = len(shards) if shards else 1
        self.create_quant_param("weight", self.output_size, input_size)
        self.create_quant_param("weight_scale", num_shards)
        self.create_quant_param("input_scale", num_shards)

    def shard_range(self, name: str, shard_id: Hashable) -> tuple[int, int]:
        """Scales hold one entry per shard; weight and bias rows come from the fused layout."""
        if name in ("weight_scale", "input_scale"):
            return self.shard_ids.index(shard_id), 1
        return super().shard_range(name, shard_id)

    def tensor_part(self, name: str, part: RankPart, loaded: torch.Tensor) -> RankPart | None:
        """Per-tensor scales apply to every row and column of their shard: each rank keeps them whole."""
        if name in ("weight_scale", "input_scale"):
            return None
        return super().tensor_part(name, part, loaded)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Hashable | None = None) -> None:
        """Per-tensor scales arrive as scalars; they fill one entry of the per-shard vector."""
        if self._param_name(param) in ("weight_scale", "input_scale"):
            check_shape(loaded.shape, () if loaded.dim() == 0 else (1,))
            loaded = loaded.reshape(1)
        super().weight_loader(param, loaded, shard_id)

    def channel_scale(self) -> torch.Tensor:
        """Per-output-channel weight scale [out] (each shard's scale repeated over its rows)."""
        sizes = torch.tensor(self.output_partition_sizes, device=self.weight_scale.device)
        return self.weight_scale.float().repeat_interleave(sizes)

    def process_weights_after_loading(self) -> None:
        """Precompute the scales the GEMM takes, once (one host read, at load time, never per step)."""
        self.gemm_input_scale = self.input_scale.float().max()  # 0-d fp32 on the weights' device
        self.gemm_channel_scale = self.channel_scale().contiguous()
        uniform = bool((self.weight_scale == self.weight_scale[0]).all())
        self.gemm_tensor_weight_scale = self.weight_scale.float()[0].clone() if uniform else None

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None, gated: bool = False) -> torch.Tensor:
        """[num_tokens, in] -> [num_tokens, out]: fp8 activation x fp8 weight, fp32 accumulate."""
        if not hasattr(self, "gemm_input_scale"):
            self.process_weights_after_loading()  # built directly (tests) rather than through the loader
        return fp8_linear(
            x, self.weight, self.gemm_input_scale, self.gemm_channel_scale, bias, self.gemm_tensor_weight_scale, gated
        )


class Int4Linear(QuantizedLinear):
    """W4A16: int4 weight packed in uint8 [out / 2, in], scales [out, in / group], optional AWQ pre_quant_scale."""

    def __init__(
        self,
        input_size: int,
        output_partition_sizes: list[int],
        shards: dict | None,
        bias: bool,
        parts: dict[Hashable, RankPart] | None = None,
    ) -> None:
        super().__init__(input_size, output_partition_sizes, shards, bias, parts)
        if any(size % 2 for size in self.output_partition_sizes):
            raise ConfigError(_odd_outputs_message(self.output_partition_sizes, tensor_parallel().size))
        self.create_quant_param("weight", self.output_size // 2, input_size)
        # The group size is read from the checkpoint: this shape's second dim is fixed at load time.
        self.create_quant_param("weight_scale", self.output_size, 1)
        self.create_param("pre_quant_scale", input_size)  # absent for RTN and where folded into a norm
        self.pre_quant_scale.optional = True

    @property
    def group_size(self) -> int:
        """Input channels per scale group."""
        return self.input_size // self.weight_scale.shape[1]

    def shard_range(self, name: str, shard_id: Hashable) -> tuple[int, int]:
        """Packed weight rows hold two output rows each."""
        offset, size = super().shard_range(name, shard_id)
        return (offset // 2, size // 2) if name == "weight" else (offset, size)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Hashable | None = None) -> None:
        """Fix the group size from the first scale tensor; fused shards must share one pre_quant_scale."""
        name = self._param_name(param)
        if name == "pre_quant_scale":
            loaded = self.rank_slice(name, loaded, shard_id)
            check_shape(loaded.shape, (self.input_size,))
            if param.is_meta:
                self._attach(name, nn.Parameter(loaded, requires_grad=False), None)
            elif not torch.equal(param.data, loaded.to(param.dtype)):
                raise WeightMappingError("fused shards carry different pre_quant_scale; kiln needs them equal")
            return
        if name == "weight_scale":
            num_groups = self.input_size // self.checkpoint_group_size(loaded)  # this rank's
            if param.shape[1] != num_groups:
                if not param.is_meta:
                    raise WeightMappingError("fused shards use different int4 group sizes")
                shape = (self.output_size, num_groups)
                self._attach(name, nn.Parameter(torch.empty(shape, device="meta"), requires_grad=False), self.shard_ids)
                param = self.weight_scale
        super().weight_loader(param, loaded, shard_id)

    def checkpoint_group_size(self, scale: torch.Tensor) -> int:
        """The group size of a checkpoint weight_scale [out, in / group], which must split this rank's inputs."""
        if scale.dim() != 2 or self.checkpoint_input_size % scale.shape[1]:
            raise WeightMappingError(
                f"weight_scale {tuple(scale.shape)} does not split input {self.checkpoint_input_size}"
            )
        group = self.checkpoint_input_size // scale.shape[1]
        if self.input_size % group:
            raise ConfigError(
                f"int4 groups of {group} input channels do not split into the {self.input_size} channels of each "
                f"of {tensor_parallel().size} tensor-parallel ranks ({self.checkpoint_input_size} in all): use a "
                f"--tp-size that gives every rank whole groups, or quantize again with a smaller --group-size"
            )
        return group

    def tensor_part(self, name: str, part: RankPart, loaded: torch.Tensor) -> RankPart | None:
        """Packed weight rows hold two output rows; scale columns hold one group of input columns each."""
        if part.dim == 0:  # column-parallel: output rows (even counts from even offsets, checked when built)
            if name == "weight":
                return RankPart(0, part.start // 2, part.length // 2)
            return None if name == "pre_quant_scale" else part  # the input is not split
        if name == "weight_scale":
            group = self.checkpoint_group_size(loaded)
            return RankPart(1, part.start // group, part.length // group)
        if name == "pre_quant_scale":
            return RankPart(0, part.start, part.length)  # [in]
        return super().tensor_part(name, part, loaded)

    def process_weights_after_loading(self) -> None:
        """A pre_quant_scale the checkpoint does not have means none (RTN, or folded into the norm)."""
        if self.pre_quant_scale is not None and self.pre_quant_scale.is_meta:
            self.pre_quant_scale = None
        self._cpu_weight = None  # dequantized anew from the tensors just loaded (this rank's shard)

    def dequantized_weight(self) -> torch.Tensor:
        """fp32 [out, in] weight: int4 values times their group's scale."""
        return dequantize_int4(self.weight, self.weight_scale)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None, gated: bool = False) -> torch.Tensor:
        """[num_tokens, in] -> [num_tokens, out]: (x * pre_quant_scale) W^T, fp32 accumulate."""
        if x.device.type == "cuda":
            return int4_linear(x, self.weight, self.weight_scale, self.pre_quant_scale, bias, gated)
        if gated:
            x = silu_and_mul_rows(x)
        # CPU (the reference path): unpacking the weight at every step made decoding ~20x slower than
        # the unquantized model; keep the fp32 weight once instead (memory is not what the CPU path is for).
        if getattr(self, "_cpu_weight", None) is None:
            self._cpu_weight = self.dequantized_weight()
        x32 = x.float() if self.pre_quant_scale is None else x.float() * self.pre_quant_scale.float()
        bias = None if bias is None else bias.float()
        return torch.nn.functional.linear(x32, self._cpu_weight, bias).to(x.dtype)


def _odd_outputs_message(sizes: list[int], tp_size: int) -> str:
    """What to do about an int4 layer whose output rows cannot be paired into bytes."""
    if tp_size == 1:
        return f"int4 layer with odd output sizes {sizes} cannot be packed; quantize this model to fp8"
    return (
        f"int4 packs two output channels per byte, but {tp_size} tensor-parallel ranks would get {sizes} "
        "output channels each; use a --tp-size that gives every rank an even number, or fp8"
    )
