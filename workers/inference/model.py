"""A loaded model version: its signature from config.pbtxt and a blocking forward pass."""

from __future__ import annotations

import io
import logging
import math
import posixpath
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.export.passes import move_to_device_pass

from mesh.errors import InvalidArgument
from protos.inference import model_config_pb2 as mc
from workers.inference.gpu.plan import GpuPlan
from workers.inference.gpu.runner import CudaRunner, InputLayout
from workers.inference.tensors import DATATYPES, BytesTensor, Tensor, TensorSpec
from workers.model_repo import DEFAULT_FILENAMES, EXPORT_PLATFORM, TORCHSCRIPT_PLATFORM, ModelRepo

log = logging.getLogger(__name__)

#: config.pbtxt ``parameters`` key: "true" freezes a TorchScript model and rewrites its
#: graph for the device at load; "false" (the default) serves it exactly as saved.
OPTIMIZE_PARAMETER = "OPTIMIZE_FOR_INFERENCE"


class ModelError(Exception):
    """The model itself failed (raised in forward, or returned the wrong outputs).

    The message is safe to send: it names the model and the kind of failure, never
    the model's own exception text (which may hold paths or data).
    """


@dataclass(frozen=True)
class Signature:
    """What a model version takes and returns, read from its config."""

    name: str
    platform: str
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @classmethod
    def from_config(cls, config: mc.ModelConfig) -> Signature:
        platform = config.platform or config.backend or TORCHSCRIPT_PLATFORM
        if platform == "pytorch":  # Triton's backend name for the same thing
            platform = TORCHSCRIPT_PLATFORM
        if platform not in DEFAULT_FILENAMES:
            raise InvalidArgument(
                f"model {config.name!r}: platform {platform!r} is not served here; "
                f"expected one of {', '.join(DEFAULT_FILENAMES)}"
            )
        if config.max_batch_size < 0:
            raise InvalidArgument(f"model {config.name!r}: max_batch_size must be >= 0")
        if not config.input or not config.output:
            raise InvalidArgument(f"model {config.name!r}: config must declare inputs and outputs")
        inputs = tuple(TensorSpec.from_config(i.name, i.data_type, i.dims) for i in config.input)
        outputs = tuple(TensorSpec.from_config(o.name, o.data_type, o.dims) for o in config.output)
        return cls(config.name, platform, config.max_batch_size, inputs, outputs)

    @property
    def input_specs(self) -> dict[str, TensorSpec]:
        return {s.name: s for s in self.inputs}

    @property
    def output_specs(self) -> dict[str, TensorSpec]:
        return {s.name: s for s in self.outputs}


def _module_bytes(module: Any) -> int:
    """Bytes of the parameters and buffers ``module`` keeps, on whatever device they live.

    Counted from the module itself rather than from the CUDA allocator's growth during
    the load: forward passes of other versions run on the same GPU meanwhile, and their
    activations come and go inside any before/after window of ``memory_allocated``.
    """
    tensors: list[torch.Tensor] = []
    if hasattr(module, "parameters"):
        tensors.extend(module.parameters())
    if hasattr(module, "buffers"):
        tensors.extend(module.buffers())
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _to_model_arg(value: Tensor, device: torch.device) -> Any:
    if isinstance(value, BytesTensor):
        # TorchScript takes strings as List[str]; BYTES that are not UTF-8 cannot cross.
        try:
            return [v.decode("utf-8") for v in value.values]
        except UnicodeDecodeError:
            raise InvalidArgument("a BYTES input is not valid UTF-8") from None
    if device.type == "cuda":
        # Pinned host memory lets the copy overlap with work already queued on the GPU.
        return value.pin_memory().to(device, non_blocking=True)
    return value


def _from_model_output(name: str, value: Any, leading: int | None) -> Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu") if value.device.type != "cpu" else value.detach()
    if isinstance(value, list | tuple) and all(isinstance(v, str | bytes) for v in value):
        values = tuple(v.encode("utf-8") if isinstance(v, str) else v for v in value)
        if leading and len(values) % leading == 0 and len(values) > 0:
            return BytesTensor(values, (leading, len(values) // leading))
        return BytesTensor(values, (len(values),))
    raise ModelError(f"output {name!r} is a {type(value).__name__}, not a tensor or strings")


class LoadedModel:
    """One model version in memory, on one device, ready to run batches."""

    def __init__(
        self,
        signature: Signature,
        version: int,
        forward: Callable[..., Any],
        device: torch.device,
        memory_bytes: int,
        *,
        optimized: bool = False,
        runner: CudaRunner | None = None,
    ) -> None:
        self.signature = signature
        self.version = version
        self._forward = forward
        self.device = device
        self.memory_bytes = memory_bytes
        #: Whether the forward pass is a frozen graph rewritten for the device at load.
        self.optimized = optimized
        #: The GPU path (streams per instance, pinned double-buffered staging, CUDA
        #: graphs); None where batches run as plain forward calls (CPU, BYTES, ...).
        self.runner = runner

    @property
    def concurrency(self) -> int | None:
        """Batches worth running at once; None: as many as the config's instance_group."""
        return self.runner.plan.concurrency if self.runner is not None else None

    @property
    def name(self) -> str:
        return self.signature.name

    def run(self, inputs: Mapping[str, Tensor], batch_size: int | None) -> dict[str, Tensor]:
        """One forward pass (blocking). ``batch_size`` is the leading dim, None if unbatched."""
        values = [inputs[spec.name] for spec in self.signature.inputs]
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        try:
            if self.runner is not None and batch_size is not None and len(tensors) == len(values):
                outputs = self.runner.run(tensors, batch_size)
                return self._named(outputs, batch_size)
            args = [_to_model_arg(v, self.device) for v in values]
            with torch.inference_mode():
                result = self._forward(*args)
        except (ModelError, InvalidArgument):
            raise
        except Exception as exc:
            # Logged whole here; the client gets only the kind of failure.
            log.warning("model %s version %s raised", self.name, self.version, exc_info=exc)
            # TorchScript wraps whatever the model raised in torch.jit.Error.
            kind = "TorchScript error" if isinstance(exc, torch.jit.Error) else type(exc).__name__
            raise ModelError(
                f"model {self.name!r} version {self.version} failed in forward: {kind}"
            ) from exc
        return self._map_outputs(result, batch_size)

    def _map_outputs(self, result: Any, batch_size: int | None) -> dict[str, Tensor]:
        return self._named(output_values(self.signature, result), batch_size)

    def _named(self, values: list[Any], batch_size: int | None) -> dict[str, Tensor]:
        return {
            spec.name: _from_model_output(spec.name, value, batch_size)
            for spec, value in zip(self.signature.outputs, values, strict=True)
        }


def output_values(signature: Signature, result: Any) -> list[Any]:
    """A forward pass's result as its outputs in config order (ModelError if it cannot be)."""
    specs = signature.outputs
    if isinstance(result, Mapping):
        missing = [s.name for s in specs if s.name not in result]
        if missing:
            raise ModelError(f"model {signature.name!r} did not return output(s) {missing}")
        values = [result[s.name] for s in specs]
    elif isinstance(result, list | tuple) and len(specs) > 1:
        values = list(result)
    else:
        values = [result]
    if len(values) != len(specs):
        raise ModelError(
            f"model {signature.name!r} returned {len(values)} outputs, its config declares "
            f"{len(specs)}"
        )
    return values


def example_inputs(signature: Signature) -> dict[str, Tensor]:
    """Inputs of batch size 1 with every variable dim 1, for the warm-up pass."""
    inputs: dict[str, Tensor] = {}
    for spec in signature.inputs:
        shape = tuple(1 if d == -1 else d for d in spec.full_shape(signature.max_batch_size))
        dtype = DATATYPES[spec.datatype].torch_dtype
        if dtype is None:
            inputs[spec.name] = BytesTensor((b"",) * math.prod(shape), shape)
        else:
            inputs[spec.name] = torch.zeros(shape, dtype=dtype)
    return inputs


def load_model(
    repo: ModelRepo, config: mc.ModelConfig, version: int, device: torch.device
) -> LoadedModel:
    """Reads a version's model file, moves it to ``device`` and warms it (blocking)."""
    signature = Signature.from_config(config)
    # Validated on every device: one repository may serve CPU and GPU workers alike.
    plan = GpuPlan.from_config(config, device.index or 0)
    filename = config.default_model_filename or DEFAULT_FILENAMES[signature.platform]
    path = posixpath.join(repo.version_path(config.name, version), filename)
    try:
        with repo.fs.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise InvalidArgument(
            f"model {config.name!r} version {version} has no {filename}"
        ) from None
    forward, memory, optimized = _deserialize(
        signature, data, device, optimizes_for_inference(config)
    )
    runner = _cuda_runner(signature, forward, plan, device)
    loaded = LoadedModel(
        signature, version, forward, device, memory, optimized=optimized, runner=runner
    )
    # Warm-up: the first pass pays for lazy init, allocator growth and kernel
    # selection; a version is not ready until it has run once.
    warm = example_inputs(signature)
    loaded.run(warm, 1 if signature.max_batch_size > 0 else None)
    return loaded


def _cuda_runner(
    signature: Signature, forward: Callable[..., Any], plan: GpuPlan, device: torch.device
) -> CudaRunner | None:
    """The GPU path for a batching model of fixed-shape tensors on CUDA; None elsewhere.

    Staging buffers are allocated once per slot at ``max_batch_size`` rows, so every
    non-batch dim must be fixed; other models keep the per-call path.
    """
    if device.type != "cuda" or signature.max_batch_size <= 0:
        return None
    layouts: list[InputLayout] = []
    for spec in signature.inputs:
        dtype = DATATYPES[spec.datatype].torch_dtype
        if dtype is None or any(d < 0 for d in spec.dims):
            return None
        layouts.append(InputLayout(spec.dims, dtype))
    if any(DATATYPES[spec.datatype].torch_dtype is None for spec in signature.outputs):
        return None

    def flatten(result: Any) -> list[Any]:
        return output_values(signature, result)

    return CudaRunner(forward, flatten, layouts, signature.max_batch_size, plan, device)


def _deserialize(
    signature: Signature, data: bytes, device: torch.device, optimize: bool
) -> tuple[Callable[..., Any], int, bool]:
    """The forward callable, the bytes its parameters and buffers hold, whether optimized.

    Memory is the model's own parameters and buffers (on CUDA too: the allocator's growth
    during a load would also count what concurrent forward passes allocate or free).
    """
    if signature.platform == EXPORT_PLATFORM:
        with warnings.catch_warnings():
            # Some torch versions warn that the archive's tensors view read-only bytes;
            # served weights are never written to.
            warnings.filterwarnings("ignore", "The given buffer is not writable", UserWarning)
            program = torch.export.load(io.BytesIO(data))
        if device.type != "cpu":
            # The graph names the device of every tensor it creates (an arange, a zeros):
            # moving only the module's weights would leave those on the CPU.
            program = move_to_device_pass(program, device)
        module = program.module()
        return module, _module_bytes(module), False
    with warnings.catch_warnings():
        # TorchScript is deprecated upstream but remains the Triton-compatible format.
        warnings.simplefilter("ignore", DeprecationWarning)
        script = torch.jit.load(io.BytesIO(data), map_location=device)  # type: ignore[no-untyped-call]
    script.eval()
    # Counted before freezing: a frozen module's weights are graph constants, not parameters.
    memory = _module_bytes(script)
    if not optimize:
        return script, memory, False
    optimized = _optimized(signature, script)
    if optimized is None:
        return script, memory, False
    return optimized, memory, True


def optimizes_for_inference(config: mc.ModelConfig) -> bool:
    """The ``OPTIMIZE_FOR_INFERENCE`` config parameter: "true" or "false" (the default).

    Off by default: the rewritten graph computes in other kernels, so its outputs may
    differ from the saved model's in the last bits, and a model is served exactly as
    published unless its config asks otherwise.
    """
    parameter = config.parameters.get(OPTIMIZE_PARAMETER)
    if parameter is None:
        return False
    value = parameter.string_value.strip().lower()
    if value not in ("true", "false"):
        raise InvalidArgument(
            f'model {config.name!r}: parameter {OPTIMIZE_PARAMETER} must be "true" or '
            f'"false", got {parameter.string_value!r}'
        )
    return value == "true"


def _optimized(signature: Signature, script: Any) -> Any | None:
    """``script`` frozen and optimized for inference; None if it cannot be.

    Freezing inlines the weights as constants and folds what depends only on them;
    ``optimize_for_inference`` then rewrites the graph for the device: on the CPU,
    convolutions and the pooling between them run in oneDNN's blocked layout and
    linear layers multiply by pre-transposed weights. The stock path runs NCHW
    ``max_pool2d`` and convolutions at almost the same cost per image at batch 30 as
    at batch 1, which caps what batching gains for CNNs (docs/benchmarks.md). One
    graph serves every batch size, so batched and unbatched requests still agree.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.optimize_for_inference(script)
    except Exception as exc:
        # Some scripted modules cannot be frozen (e.g. forward assigns a submodule of
        # an interface type); they serve as saved rather than not at all.
        log.warning("model %s: serving without optimize_for_inference: %s", signature.name, exc)
        return None
