"""A recording stand-in for the ``tensorrt`` module: what the runtime's engine build asks of TensorRT.

No TensorRT runs on these machines. This fake implements the few calls ``_build_engine`` makes
(builder, ONNX parser, builder config, optimization profiles) and records them, so a test can
check which builder flags a build spec becomes. The parser reads the real ONNX file's inputs (a
graph that does not parse as ONNX is refused like TensorRT's parser would); nothing else of an
engine build is imitated: kernels, sparsity use and numerics need a GPU.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class BuilderFlag(enum.Enum):
    FP16 = "FP16"
    INT8 = "INT8"
    SPARSE_WEIGHTS = "SPARSE_WEIGHTS"
    GPU_FALLBACK = "GPU_FALLBACK"


class MemoryPoolType(enum.Enum):
    WORKSPACE = "WORKSPACE"


class DeviceType(enum.Enum):
    GPU = "GPU"
    DLA = "DLA"


@dataclass
class _Input:
    name: str
    shape: tuple[int, ...]


@dataclass
class _Network:
    inputs: list[_Input] = field(default_factory=list)

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, i: int) -> _Input:
        return self.inputs[i]


@dataclass
class _Config:
    flags: set[BuilderFlag] = field(default_factory=set)
    pools: dict[MemoryPoolType, int] = field(default_factory=dict)
    profiles: list[Any] = field(default_factory=list)
    builder_optimization_level: int = 3
    default_device_type: DeviceType = DeviceType.GPU
    DLA_core: int = -1

    def set_flag(self, flag: BuilderFlag) -> None:
        self.flags.add(flag)

    def set_memory_pool_limit(self, pool: MemoryPoolType, size: int) -> None:
        self.pools[pool] = size

    def add_optimization_profile(self, profile: Any) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1


class _Profile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[Any, Any, Any]] = {}

    def set_shape(self, name: str, lo: Any, opt: Any, hi: Any) -> None:
        self.shapes[name] = (lo, opt, hi)


class FakeTensorRTModule:
    """Pass where the runtime expects the ``tensorrt`` module; ``configs`` holds every builder config built."""

    __version__ = "10.3.0"
    BuilderFlag = BuilderFlag
    MemoryPoolType = MemoryPoolType
    DeviceType = DeviceType

    def __init__(self, dla_cores: int = 0) -> None:
        self.configs: list[_Config] = []
        self.built: list[tuple[_Network, _Config]] = []
        fake = self

        class Builder:
            num_DLA_cores = dla_cores

            def __init__(self, logger: Any) -> None:
                self.logger = logger

            def create_network(self, flags: int) -> _Network:
                return _Network()

            def create_builder_config(self) -> _Config:
                fake.configs.append(_Config())
                return fake.configs[-1]

            def create_optimization_profile(self) -> _Profile:
                return _Profile()

            def build_serialized_network(self, network: _Network, config: _Config) -> bytes:
                fake.built.append((network, config))
                return b"fake plan"

        class OnnxParser:
            def __init__(self, network: _Network, logger: Any) -> None:
                self.network = network
                self.num_errors = 0

            def parse(self, data: bytes, path: str) -> bool:
                import onnx

                try:
                    model = onnx.load_from_string(data)
                except Exception:
                    self.num_errors = 1
                    return False
                weights = {t.name for t in model.graph.initializer}
                for value in model.graph.input:
                    if value.name in weights:
                        continue
                    dims = value.type.tensor_type.shape.dim
                    shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)
                    self.network.inputs.append(_Input(value.name, shape))
                return True

            def get_error(self, i: int) -> str:
                return "not an ONNX model"

        self.Builder = Builder
        self.OnnxParser = OnnxParser

    def init_libnvinfer_plugins(self, logger: Any, namespace: str) -> None:
        pass
