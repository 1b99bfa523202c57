"""Hardware profiles and the analytic cost model the budget solve uses.

A profile is data (peak FLOP/s, memory bandwidth, preferred block, power figures); the cost of one linear
layer follows from it by a roofline model of a block-sparse GEMM — no measured look-up tables:

    flops   = 2 * rows * kept_blocks * bh * bw                      (rows = batch_size * tokens)
    bytes   = 4 * (kept_blocks*bh*bw + rows*(in + out)) + 8 * (kept_blocks + out/bh + 1)   (values, X, Y, indices)
    eff     = sparse_efficiency * min(1, bh/min_efficient_block) * min(1, bw/min_efficient_block)
    latency = call_overhead_s + max(flops / (peak_flops * eff), bytes / memory_bandwidth)
              + sparse_output_s * rows * out + sparse_input_s * rows * in    (block-sparse only, whatever is kept)
    energy  = static_power_w * latency + energy_per_flop_j * flops + energy_per_byte_j * bytes

A dense layer uses eff = 1 and stores the whole weight without indices. The rest of the model costs its FLOPs
(attention's products, the patch embedding: ``other_flops``) at peak and the bytes its memory-bound ops move
(norms, activations, softmax, residual adds, copies, token selection and merging: ``other_bytes``,
costmodel.flops) at the runtime's elementwise bandwidth:

    latency_other = other_flops / peak_flops + other_bytes / elementwise_bandwidth
    energy_other  = static_power_w * latency_other + energy_per_flop_j * other_flops + energy_per_byte_j * other_bytes

LPViT's power proxy (``power_model="lpvit"``) is kept_blocks * floor(in_features / 16).

To change the cost model, edit :meth:`HardwareProfile.linear_cost`; to add a target, add a profile to
``PROFILES``. The figures below are vendor peak numbers with published-typical efficiency/power estimates,
stated per field. ``hw="native"`` fits the CPU profile's coefficients to a micro-benchmark of the built
kernel and onnxruntime's dense GEMM on this machine (``native.py``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from ..runtime.sessions import cpu_info, default_threads

INDEX_BYTES = 8  # int64 row_ptr / col_idx entries, the ONNX op's contract


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    description: str
    peak_flops: float  # dense fp32 GEMM throughput, FLOP/s
    memory_bandwidth: float  # bytes/s
    block_shape: tuple[int, int]  # preferred (bh, bw), used when compile() gets no block_shape
    min_efficient_block: int  # block edge below which a sparse kernel loses throughput proportionally
    sparse_efficiency: float  # block-sparse kernel throughput with full-size blocks, relative to dense
    call_overhead_s: float  # fixed cost of one layer call (kernel launch, thread-pool fork/join)
    static_power_w: float  # power drawn while busy regardless of work
    energy_per_flop_j: float
    energy_per_byte_j: float
    batch_size: int  # images per inference that predictions are made for
    bytes_per_value: int = 4  # fp32
    calibration: str = "vendor figures and published estimates"  # where the coefficients came from
    # seconds per output / input element of a block-sparse layer whatever its kept blocks (write-back and
    # epilogue; X rows too long to stay in L1 across a block row): what makes the kernel's time per kept FLOP
    # depend on density and shape; fitted by "native", 0 in the vendor profiles
    sparse_output_s: float = 0.0
    sparse_input_s: float = 0.0
    # multiply-accumulates per second of the int8 block-sparse kernel relative to its float32 one (quantize="int8":
    # 4 int8 products per 32-bit lane with VNNI, 2 with AVX2's vpmaddwd; 1 where there is no int8 path)
    int8_throughput: float = 1.0
    # bytes/s at which the runtime's memory-bound ops (norms, GELU, softmax, adds, transposes) move their inputs
    # and outputs, far below memory_bandwidth in onnxruntime; inf (the default, for profiles saved before it
    # existed) gives those ops no time, as the cost model did then
    elementwise_bandwidth: float = float("inf")

    def __post_init__(self):
        # the rates the cost model divides by: zero or negative would predict infinite or negative latencies
        for name in ("peak_flops", "memory_bandwidth", "elementwise_bandwidth", "batch_size"):
            value = getattr(self, name)
            if not value > 0:
                raise ConfigError(f"HardwareProfile {self.name!r}: {name} must be positive, got {value!r}")

    def linear_cost(
        self,
        tokens: int,
        kept_blocks: np.ndarray,
        block_shape: tuple[int, int],
        in_features: int,
        out_features: int,
        sparse: bool = True,
        int8: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(latency seconds, energy joules) of one linear layer per inference, for each kept-block count; ``int8``:
        the int8 block-sparse kernel (1-byte weights, ``int8_throughput`` times the MAC rate)."""
        bh, bw = block_shape
        kept = np.asarray(kept_blocks, dtype=np.float64)
        rows = self.batch_size * tokens
        flops = 2.0 * rows * kept * bh * bw
        activation_bytes = self.bytes_per_value * rows * (in_features + out_features)
        if sparse:
            eff = (
                self.sparse_efficiency
                * min(1.0, bh / self.min_efficient_block)
                * min(1.0, bw / self.min_efficient_block)
            )
            value_bytes = 1 if int8 else self.bytes_per_value
            eff *= self.int8_throughput if int8 else 1.0
            weight_bytes = value_bytes * kept * bh * bw + INDEX_BYTES * (kept + out_features / bh + 1)
            per_output = rows * (self.sparse_output_s * out_features + self.sparse_input_s * in_features)
        else:
            eff = 1.0
            weight_bytes = self.bytes_per_value * kept * bh * bw
            per_output = 0.0
        total_bytes = weight_bytes + activation_bytes
        latency = self.call_overhead_s + per_output + np.maximum(flops / (self.peak_flops * eff),
                                                                 total_bytes / self.memory_bandwidth)
        energy = self.static_power_w * latency + self.energy_per_flop_j * flops + self.energy_per_byte_j * total_bytes
        return latency, energy

    def other_cost(self, flops_per_image: float, bytes_per_image: float) -> tuple[float, float]:
        """(latency, energy) per inference of the rest of the model (module docstring): its FLOPs at dense
        throughput, the bytes its memory-bound ops move at ``elementwise_bandwidth``."""
        flops, moved = flops_per_image * self.batch_size, bytes_per_image * self.batch_size
        latency = flops / self.peak_flops + moved / self.elementwise_bandwidth
        return latency, self.static_power_w * latency + self.energy_per_flop_j * flops + self.energy_per_byte_j * moved

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "block_shape": list(self.block_shape)}

    @classmethod
    def from_dict(cls, data: dict) -> "HardwareProfile":
        return cls(**{**data, "block_shape": tuple(data["block_shape"])})


@dataclass(frozen=True)
class LayerCosts:
    """Predicted cost of one linear layer as it is (its shape, tokens and kept blocks), per inference."""

    shape: tuple[int, int]  # [out, in] of the weight now
    kept_blocks: int  # live blocks in that shape
    flops_dense: float  # per image: 2 * tokens * out * in
    flops_kept: float  # per image: 2 * tokens * kept_blocks * bh * bw (padding of edge blocks included)
    dense_latency_s: float
    dense_energy_j: float
    sparse_latency_s: float
    sparse_energy_j: float

    @property
    def sparse_faster(self) -> bool:
        return self.sparse_latency_s < self.dense_latency_s

    def latency(self, sparse: bool) -> float:
        return self.sparse_latency_s if sparse else self.dense_latency_s

    def energy(self, sparse: bool) -> float:
        return self.sparse_energy_j if sparse else self.dense_energy_j


def layer_costs(hw: HardwareProfile, tokens: int, shape: tuple[int, int], block_shape: tuple[int, int],
                kept_blocks: int, int8: bool = False) -> LayerCosts:
    """:class:`LayerCosts` of a [out, in] linear on ``tokens`` tokens per image with ``kept_blocks`` blocks (on
    the int8 kernel if ``int8``; the dense alternative is always the float32 GEMM)."""
    out_features, in_features = shape
    block_elements = block_shape[0] * block_shape[1]
    sparse_latency, sparse_energy = hw.linear_cost(tokens, kept_blocks, block_shape, in_features, out_features,
                                                   int8=int8)
    dense_latency, dense_energy = hw.linear_cost(tokens, out_features * in_features / block_elements, block_shape,
                                                 in_features, out_features, sparse=False)
    return LayerCosts(shape=(out_features, in_features), kept_blocks=int(kept_blocks),
                      flops_dense=2.0 * tokens * out_features * in_features,
                      flops_kept=2.0 * tokens * kept_blocks * block_elements,
                      dense_latency_s=float(dense_latency), dense_energy_j=float(dense_energy),
                      sparse_latency_s=float(sparse_latency), sparse_energy_j=float(sparse_energy))


def lpvit_power_proxy(kept_blocks: np.ndarray, in_features: int) -> np.ndarray:
    """LPViT's power proxy of a layer: kept blocks * floor(in_features / 16)."""
    return np.asarray(kept_blocks, dtype=np.float64) * (in_features // 16)


def _cpu(name: str, cores: int, avx512: bool, vnni: bool = False) -> HardwareProfile:
    lanes = 16 if avx512 else 8  # fp32 lanes per vector
    clock_hz = 2.5e9
    peak = cores * clock_hz * lanes * 2 * 2  # 2 FMA units, 2 FLOP per FMA
    return HardwareProfile(
        name=name,
        description=f"x86-64 CPU, {cores} cores, {'AVX-512' if avx512 else 'AVX2'}/FMA, 2.5 GHz, fp32",
        peak_flops=peak,
        memory_bandwidth=20e9 * max(1, cores // 4),  # ~20 GB/s per DDR channel pair
        block_shape=(16, 16),
        min_efficient_block=16,  # register tile of the micro-kernel
        sparse_efficiency=0.85,
        call_overhead_s=5e-6,
        static_power_w=5.0 * cores,
        energy_per_flop_j=10.0 * cores / peak,  # ~10 W per busy core
        energy_per_byte_j=1.5e-10,  # DDR4/5 access, ~20 pJ/bit
        batch_size=8,
        # measured: DeiT-S's memory-bound ops in onnxruntime, exported with the head-major lowering, moved 9.1 GB/s
        # per thread (median of six runs, 6.3-12.5 as the shared host's speed drifted; 7.2 before that lowering)
        # on an AMD EPYC (family 26, AVX-512, 2 threads; benchmarks/elementwise_bandwidth.py), far below
        # memory_bandwidth; hw="native" measures it
        elementwise_bandwidth=9e9 * cores,
        # vendor estimate from the instruction mix (vpdpbusd: 4x the products of an FMA, vpmaddwd 2x), less the
        # per-token quantization and dequantisation; hw="native" measures it
        int8_throughput=2.5 if vnni else 1.6,
    )


def this_cpu() -> HardwareProfile:
    flags = cpu_info()
    return _cpu("cpu", default_threads(), "avx512f" in flags, "avx512_vnni" in flags and "avx512bw" in flags)


PROFILES: dict[str, HardwareProfile] = {
    "a100": HardwareProfile(
        name="a100",
        description="NVIDIA A100 SXM 80GB, fp32 CUDA cores",
        peak_flops=19.5e12,
        memory_bandwidth=2.039e12,
        elementwise_bandwidth=0.7 * 2.039e12,  # estimate: streaming kernels reach ~70% of peak bandwidth
        block_shape=(32, 32),
        min_efficient_block=32,
        sparse_efficiency=0.7,
        call_overhead_s=5e-6,
        static_power_w=60.0,
        energy_per_flop_j=(400.0 - 60.0) * 0.8 / 19.5e12,  # 400 W TDP, ~80% of dynamic power in compute
        energy_per_byte_j=2.0e-11,  # HBM2e, ~2.5 pJ/bit
        batch_size=64,
    ),
    "h100": HardwareProfile(
        name="h100",
        description="NVIDIA H100 SXM 80GB, fp32 CUDA cores",
        peak_flops=67e12,
        memory_bandwidth=3.35e12,
        elementwise_bandwidth=0.7 * 3.35e12,  # estimate: streaming kernels reach ~70% of peak bandwidth
        block_shape=(64, 64),
        min_efficient_block=64,
        sparse_efficiency=0.7,
        call_overhead_s=4e-6,
        static_power_w=90.0,
        energy_per_flop_j=(700.0 - 90.0) * 0.8 / 67e12,
        energy_per_byte_j=1.8e-11,  # HBM3
        batch_size=64,
    ),
    "cpu-avx2": _cpu("cpu-avx2", cores=8, avx512=False),
    "cpu-avx512": _cpu("cpu-avx512", cores=8, avx512=True, vnni=True),
}
