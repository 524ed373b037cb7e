"""TensorRT backend: build an engine on the device from a Q/DQ ONNX graph, cache it, run it.

A ``tensorrt-onnx`` package holds an ONNX graph with explicit symmetric Q/DQ nodes
and, next to it, ``build_spec.json`` (``BuildSpec``). Engines are tied to the GPU
architecture and the TensorRT version, so the device builds the engine itself on
first load and keeps it in an engine cache.

The backend is split in three modules:

* ``edgeship.runtime.backends.tensorrt_spec``: ``BuildSpec`` parsing and validation,
  version comparison, and the checks of optimization profiles against the network (pure).
* ``edgeship.runtime.backends.engine_cache``: ``EngineCacheKey`` and its digest, the
  decision whether a cached engine may be used, and the load-or-rebuild policy (files only).
* This module, the library boundary: every ``tensorrt`` and ``cuda`` (cuda-python) import
  happens inside a function, never at module import, so ``edgeship.runtime`` imports on
  any machine. Device memory is handled by one small class, ``_DeviceBuffers``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from edgeship.errors import ArtifactError, BackendUnavailableError, InputError, ModelLoadError
from edgeship.runtime.backends.base import Backend, BackendOptions, LoadedModel, TensorInfo
from edgeship.runtime.backends.engine_cache import (
    DEFAULT_CACHE_DIR,
    EngineCache,
    EngineCacheKey,
    load_or_build,
    package_sha256,
)
from edgeship.runtime.backends.tensorrt_spec import (
    BUILD_SPEC_NAME,
    BuildSpec,
    check_network_inputs,
    check_tensorrt_version,
    choose_profile,
    describe_profiles,
    precision_flags,
)
from edgeship.runtime.package.manifest import Manifest

log = logging.getLogger(__name__)

TENSORRT_MISSING = (
    "the tensorrt Python package is not installed (JetPack ships it: sudo apt-get install python3-libnvinfer; "
    "a venv must be created with --system-site-packages to see it)"
)
CUDA_PYTHON_MISSING = (
    "the cuda-python package is not installed (pip install 'cuda-python>=12,<13' on JetPack 6; "
    "its major version must match the installed CUDA)"
)


def _import_tensorrt() -> ModuleType:
    return importlib.import_module("tensorrt")


def _import_cudart() -> ModuleType:
    try:
        return importlib.import_module("cuda.bindings.runtime")  # cuda-python >= 12.6
    except ImportError:
        return importlib.import_module("cuda.cudart")  # older cuda-python


def _cuda_python_installed() -> bool:
    if importlib.util.find_spec("cuda") is None:
        return False
    return any(importlib.util.find_spec(name) is not None for name in ("cuda.bindings", "cuda.cudart"))


def _cuda_check(cudart: ModuleType, result: Any, what: str) -> Any:
    """Unpack a cuda-python ``(error, *values)`` result; raise ``ModelLoadError`` unless it succeeded."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if error != cudart.cudaError_t.cudaSuccess:
        name = cudart.cudaGetErrorName(error)[1]
        raise ModelLoadError(f"CUDA {what} failed: {name.decode() if isinstance(name, bytes) else name}")
    return values[0] if len(values) == 1 else None


def _cuda_device_problem() -> str | None:
    """None when a CUDA device is visible; otherwise why not, in one line. Never raises."""
    try:
        cudart = _import_cudart()
        error, count = cudart.cudaGetDeviceCount()
    except Exception as exc:  # a broken cuda-python or driver install is a reason, not a crash
        return f"cuda-python cannot query CUDA devices ({type(exc).__name__}: {exc}); check the CUDA and driver install"
    if error != cudart.cudaError_t.cudaSuccess or count < 1:
        name = cudart.cudaGetErrorName(error)[1] if error != cudart.cudaError_t.cudaSuccess else b"0 devices"
        return (
            f"no CUDA device is visible ({name.decode() if isinstance(name, bytes) else name}); check the NVIDIA "
            "driver, that this user is in the 'video' group, and in Docker run with --runtime nvidia"
        )
    return None


def _cuda_device_identity(cudart: ModuleType) -> tuple[str, str]:
    """Name and compute capability ("8.7") of the current CUDA device."""
    device = _cuda_check(cudart, cudart.cudaGetDevice(), "cudaGetDevice")
    props = _cuda_check(cudart, cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    raw = props.name
    name = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    return name.rstrip("\x00").strip(), f"{props.major}.{props.minor}"


class _DeviceBuffers:
    """All device memory of one loaded model: a CUDA stream and one growable buffer per I/O tensor."""

    def __init__(self, cudart: ModuleType) -> None:
        self._rt = cudart
        self._stream = _cuda_check(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._buffers: dict[str, tuple[int, int]] = {}  # tensor name -> (device pointer, capacity in bytes)

    @property
    def stream_handle(self) -> int:
        return int(self._stream)

    def reserve(self, name: str, nbytes: int) -> int:
        """A device pointer for tensor ``name`` with at least ``nbytes`` bytes (reallocated when too small)."""
        pointer, capacity = self._buffers.get(name, (0, -1))
        if capacity < nbytes:
            if pointer:
                _cuda_check(self._rt, self._rt.cudaFree(pointer), "cudaFree")
                del self._buffers[name]
            pointer = int(_cuda_check(self._rt, self._rt.cudaMalloc(max(nbytes, 1)), f"cudaMalloc({nbytes})"))
            self._buffers[name] = (pointer, max(nbytes, 1))
        return pointer

    def upload(self, name: str, array: np.ndarray[Any, Any]) -> int:
        """Queue a copy of the C-contiguous ``array`` to tensor ``name``'s buffer; return its device pointer."""
        pointer = self.reserve(name, array.nbytes)
        kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        _cuda_check(
            self._rt,
            self._rt.cudaMemcpyAsync(pointer, array.ctypes.data, array.nbytes, kind, self._stream),
            "copy to device",
        )
        return pointer

    def download(self, name: str, out: np.ndarray[Any, Any]) -> None:
        """Queue a copy of tensor ``name``'s buffer into the C-contiguous ``out``."""
        pointer, _ = self._buffers[name]
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _cuda_check(
            self._rt, self._rt.cudaMemcpyAsync(out.ctypes.data, pointer, out.nbytes, kind, self._stream), "copy to host"
        )

    def synchronize(self) -> None:
        _cuda_check(self._rt, self._rt.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

    def close(self) -> None:
        for pointer, _ in self._buffers.values():
            self._rt.cudaFree(pointer)
        self._buffers.clear()
        if self._stream is not None:
            self._rt.cudaStreamDestroy(self._stream)
            self._stream = None

    def __del__(self) -> None:
        # A model dropped without close() still returns its device memory (not at interpreter exit,
        # when cuda-python may already be gone).
        with contextlib.suppress(Exception):
            self.close()


@functools.lru_cache(maxsize=1)
def _shared_logger(trt: ModuleType) -> Any:
    """The process's TensorRT logger: forwards to Python logging and remembers errors for error messages.

    One instance for every builder and runtime: TensorRT keeps the first logger it is given
    as its global logger and warns when later ones differ.
    """

    base: Any = trt.ILogger

    class _Logger(base):  # type: ignore[misc]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
                log.error("TensorRT: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.warning("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

    return _Logger()


def _recent_errors(logger: Any) -> str:
    errors: list[str] = logger.errors[-3:]
    return f" (TensorRT said: {' | '.join(errors)})" if errors else ""


def _forget_errors(logger: Any) -> None:
    logger.errors.clear()


def _build_engine(trt: ModuleType, logger: Any, onnx_path: Path, spec: BuildSpec) -> bytes:
    """Parse the ONNX graph and build a serialized engine. Raises ``ModelLoadError`` naming what failed."""
    _forget_errors(logger)
    trt.init_libnvinfer_plugins(logger, "")
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes(), str(onnx_path)):  # the path locates external weights
        problems = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ModelLoadError(
            f"TensorRT's ONNX parser refused {onnx_path.name}: " + ("; ".join(problems) or "no details given")
        )
    network_inputs: dict[str, tuple[int, ...]] = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        network_inputs[tensor.name] = tuple(int(d) for d in tensor.shape)
    check_network_inputs(network_inputs, spec.optimization_profiles)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.workspace_mib << 20)
    config.builder_optimization_level = spec.builder_optimization_level
    for flag_name in precision_flags(spec.precision):
        flag = getattr(trt.BuilderFlag, flag_name, None)
        if flag is None:  # TensorRT 11 removed precision flags: networks are strongly typed
            log.warning(
                "TensorRT %s has no BuilderFlag.%s; precision follows the graph's types", trt.__version__, flag_name
            )
        else:
            config.set_flag(flag)
    if spec.sparsity_2_4:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    if spec.dla_core is not None:
        cores = int(builder.num_DLA_cores)
        if spec.dla_core >= cores:
            raise ModelLoadError(
                f"{BUILD_SPEC_NAME} asks for DLA core {spec.dla_core}, but this device has {cores} DLA core(s); "
                "compile the package for this device (dla_core null runs on the GPU)"
            )
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = spec.dla_core
        if spec.allow_gpu_fallback:
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    for profile in spec.optimization_profiles:
        trt_profile = builder.create_optimization_profile()
        for r in profile.inputs:
            trt_profile.set_shape(r.name, r.min, r.opt, r.max)
        if config.add_optimization_profile(trt_profile) < 0:
            raise ModelLoadError(
                f"TensorRT rejected an optimization profile from {BUILD_SPEC_NAME}{_recent_errors(logger)}"
            )

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ModelLoadError(f"TensorRT could not build an engine from {onnx_path.name}{_recent_errors(logger)}")
    return bytes(memoryview(plan))


def _numpy_dtype(trt: ModuleType, trt_dtype: Any, name: str) -> np.dtype[Any]:
    try:
        dtype: np.dtype[Any] = np.dtype(trt.nptype(trt_dtype))
    except TypeError:
        raise ModelLoadError(f"engine tensor {name!r} has type {trt_dtype}, which numpy cannot hold") from None
    return dtype


class _TensorRTModel(LoadedModel):
    """A deserialized engine with one execution context and its device buffers. Not thread-safe."""

    # An IExecutionContext holds the bound shapes, tensor addresses and the profile in use, and
    # TensorRT says one context must not be used by two threads at once: the Session serializes.
    thread_safe = False

    def __init__(self, trt: ModuleType, cudart: ModuleType, runtime: Any, engine: Any, spec: BuildSpec) -> None:
        self._runtime = runtime  # must outlive the engine
        self._engine = engine
        self._spec = spec
        self._context = engine.create_execution_context()
        if self._context is None:
            raise ModelLoadError("TensorRT could not create an execution context (out of device memory?)")
        self._profile = 0
        inputs: list[TensorInfo] = []
        outputs: list[TensorInfo] = []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            shape = tuple(None if int(d) < 0 else int(d) for d in engine.get_tensor_shape(name))
            info = TensorInfo(name, shape, _numpy_dtype(trt, engine.get_tensor_dtype(name), name))
            (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(info)
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.library = f"tensorrt {trt.__version__}"
        self._buffers = _DeviceBuffers(cudart)

    def run(self, feeds: Sequence[np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
        if len(feeds) != len(self.inputs):
            raise InputError(f"the engine takes {len(self.inputs)} inputs, got {len(feeds)}")
        arrays = [np.ascontiguousarray(f) for f in feeds]
        for info, array in zip(self.inputs, arrays, strict=True):
            if array.dtype != info.dtype:
                raise InputError(f"input {info.name!r} must be {info.dtype}, got {array.dtype}")
        self._select_profile({i.name: a.shape for i, a in zip(self.inputs, arrays, strict=True)})
        context = self._context
        for info, array in zip(self.inputs, arrays, strict=True):
            if not context.set_input_shape(info.name, array.shape):
                raise InputError(
                    f"input {info.name!r} has shape {array.shape}; the engine accepts "
                    f"{describe_profiles(self._spec.optimization_profiles, info.name)}"
                )
            context.set_tensor_address(info.name, self._buffers.upload(info.name, array))
        results = []
        for info in self.outputs:
            shape = tuple(int(d) for d in context.get_tensor_shape(info.name))
            if any(d < 0 for d in shape):
                raise ModelLoadError(
                    f"output {info.name!r} has a data-dependent shape {shape}; edgeship's TensorRT backend needs "
                    "output shapes that follow from the input shapes"
                )
            out = np.empty(shape, dtype=info.dtype)
            context.set_tensor_address(info.name, self._buffers.reserve(info.name, out.nbytes))
            results.append(out)
        if not context.execute_async_v3(self._buffers.stream_handle):
            raise ModelLoadError("TensorRT failed to enqueue the engine (see the TensorRT log above)")
        for info, out in zip(self.outputs, results, strict=True):
            self._buffers.download(info.name, out)
        self._buffers.synchronize()  # also keeps `arrays` alive until the copies to the device are done
        return results

    def _select_profile(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        if self._engine.num_optimization_profiles <= 1:
            return
        index = choose_profile(self._spec.optimization_profiles, shapes)
        if index is None:
            name, shape = next(iter(shapes.items()))
            raise InputError(
                f"no optimization profile accepts these input shapes (input {name!r}: {shape}; allowed "
                f"{describe_profiles(self._spec.optimization_profiles, name)})"
            )
        if index != self._profile:
            if not self._context.set_optimization_profile_async(index, self._buffers.stream_handle):
                raise ModelLoadError(f"TensorRT could not switch to optimization profile {index}")
            self._profile = index

    def close(self) -> None:
        self._context = None
        self._engine = None
        self._runtime = None
        self._buffers.close()


class TensorRTBackend(Backend):
    """Runs ``tensorrt-onnx`` packages with TensorRT (10 or newer) on an NVIDIA GPU or DLA.

    Options: ``cache_dir`` (default ``~/.cache/edgeship/engines``); threads and delegates are
    ignored (the build spec chooses GPU or DLA).
    """

    name = "tensorrt"
    formats = ("tensorrt-onnx",)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if importlib.util.find_spec("tensorrt") is None:
            return TENSORRT_MISSING
        if not _cuda_python_installed():
            return CUDA_PYTHON_MISSING
        return _cuda_device_problem()

    @classmethod
    def load(cls, artifact: Path, manifest: Manifest, options: BackendOptions) -> LoadedModel:
        """Build (or take from the cache) an engine for ``artifact`` and open it.

        Raises ``BackendUnavailableError`` without TensorRT, cuda-python or a CUDA device;
        ``ArtifactError`` for a missing or invalid ``build_spec.json``; ``ModelLoadError``
        when TensorRT is too old or refuses the graph, the spec or the engine.
        """
        reason = cls.unavailable_reason()
        if reason is not None:
            raise BackendUnavailableError(f"backend 'tensorrt' cannot run here: {reason}")
        spec_path = artifact.parent / BUILD_SPEC_NAME
        if not artifact.is_file():
            raise ArtifactError(f"the ONNX graph {artifact} is missing or not a file")
        try:
            spec = BuildSpec.from_json(spec_path.read_bytes())
            package_digest = package_sha256(artifact)
        except FileNotFoundError as exc:
            raise ArtifactError(
                f"{Path(exc.filename).name} is missing beside {artifact.name}; a tensorrt-onnx package holds "
                f"the ONNX graph and {BUILD_SPEC_NAME} in one folder"
            ) from None
        except OSError as exc:
            raise ArtifactError(f"cannot read the TensorRT package files in {artifact.parent}: {exc}") from None

        trt = _import_tensorrt()
        check_tensorrt_version(trt.__version__, spec.min_tensorrt_version)
        cudart = _import_cudart()
        gpu_name, capability = _cuda_device_identity(cudart)
        key = EngineCacheKey(gpu_name, capability, str(trt.__version__), package_digest, spec.sha256())
        cache = EngineCache((options.cache_dir or DEFAULT_CACHE_DIR).expanduser())

        logger = _shared_logger(trt)
        runtime = trt.Runtime(logger)
        if spec.dla_core is not None:
            runtime.DLA_core = spec.dla_core
        engine = load_or_build(
            cache,
            key,
            build=lambda: _build_engine(trt, logger, artifact, spec),
            deserialize=runtime.deserialize_cuda_engine,
        )
        return _TensorRTModel(trt, cudart, runtime, engine, spec)
