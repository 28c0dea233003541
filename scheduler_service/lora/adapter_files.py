"""Reads and checks a PEFT LoRA adapter directory without torch: its config, and the names and shapes of
its tensors (the safetensors header, or the pickle of a torch `.bin` read by a restricted unpickler that
builds no tensor and imports nothing)."""

from __future__ import annotations

import json
import pickle
import re
import struct
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from shared.lora.adapter_config import LoraAdapterConfig, adapter_directory, read_adapter_config
from shared.lora.target_modules import LORA_TARGET_MODULES, module_shapes

SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"
MAX_HEADER_BYTES = 100 * 1024 * 1024
_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.([a-z_]+)\.lora_([AB])(?:\.default)?\.weight$"
)


@dataclass(frozen=True, slots=True)
class LoraModelShape:
    """The base model's dimensions an adapter must match (`shared.lora.target_modules.ProjectionSizes`)."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    q_size: int
    kv_size: int


@dataclass(frozen=True, slots=True)
class AdapterSpec:
    """What registering an adapter learned from its files: its resolved directory and its checked config."""

    path: str
    config: LoraAdapterConfig

    @property
    def rank(self) -> int:
        return self.config.rank

    @property
    def target_modules(self) -> tuple[str, ...]:
        return self.config.target_modules

    @property
    def scaling(self) -> float:
        return self.config.scaling


def inspect_adapter(path: str, model: LoraModelShape, max_rank: int) -> AdapterSpec:
    """Reads `path`'s adapter_config.json and tensor shapes and checks them against `model`; raises
    ValueError naming what is missing, broken or unsupported."""
    directory = adapter_directory(path)
    config = read_adapter_config(directory, max_rank)
    _check_tensors(path, _tensor_shapes(directory), config, model)
    return AdapterSpec(path=str(directory.resolve()), config=config)


def _check_tensors(
    path: str, shapes: Mapping[str, tuple[int, ...]], config: LoraAdapterConfig, model: LoraModelShape
) -> None:
    found: dict[tuple[int, str, str], tuple[int, ...]] = {}
    for key, shape in shapes.items():
        match = _KEY.match(key)
        if match is None:
            raise ValueError(f"{path}: unexpected tensor {key!r} (only lora_A/lora_B of {', '.join(LORA_TARGET_MODULES)})")
        layer, module, which = int(match[1]), match[2], match[3]
        if module not in config.target_modules:
            raise ValueError(f"{path}: tensor {key!r} is for {module}, not in target_modules")
        if layer >= model.num_layers:
            raise ValueError(f"{path}: tensor {key!r} is for layer {layer}; the model has {model.num_layers}")
        found[(layer, module, which)] = shape
    sizes = module_shapes(model)
    for layer in range(model.num_layers):
        for module in config.target_modules:
            in_features, out_features = sizes[module]
            expected = {"A": (config.rank, in_features), "B": (out_features, config.rank)}
            for which, want in expected.items():
                got = found.get((layer, module, which))
                name = f"layer {layer} {module}.lora_{which}"
                if got is None:
                    raise ValueError(f"{path}: {name} is missing")
                if tuple(got) != want:
                    raise ValueError(f"{path}: {name} has shape {list(got)}, the model needs {list(want)}")


def _tensor_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    if (directory / SAFETENSORS_FILE).is_file():
        return _safetensors_shapes(directory / SAFETENSORS_FILE)
    if (directory / BIN_FILE).is_file():
        return _bin_shapes(directory / BIN_FILE)
    raise ValueError(f"{directory} has neither {SAFETENSORS_FILE} nor {BIN_FILE}")


def _safetensors_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes from the header; checks the data the header describes is all in the file."""
    size = file.stat().st_size
    with file.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{file} is too short to be a safetensors file")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"{file} is not a safetensors file (header length {header_len})")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{file} has a broken safetensors header: {error}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{file} has a broken safetensors header")
    shapes: dict[str, tuple[int, ...]] = {}
    data_bytes = size - 8 - header_len
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            shape = tuple(int(d) for d in entry["shape"])
            end = int(entry["data_offsets"][1])
        except (KeyError, TypeError, ValueError, IndexError):
            raise ValueError(f"{file}: tensor {name!r} has a broken header entry") from None
        if end > data_bytes:
            raise ValueError(f"{file} is truncated: tensor {name!r} ends at byte {end} of {data_bytes}")
        shapes[name] = shape
    return shapes


class _TensorShape:
    def __init__(self, size: tuple[int, ...]) -> None:
        self.size = tuple(int(d) for d in size)


def _rebuild_tensor(storage: object, offset: int, size: tuple[int, ...], *rest: object) -> _TensorShape:
    return _TensorShape(size)


class _ShapeUnpickler(pickle.Unpickler):
    """Unpickles a torch state dict into shapes only: the names it may resolve are a fixed few stand-ins."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        if (module, name) in (("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")):
            return _rebuild_tensor
        if module == "torch" and (name.endswith("Storage") or name in ("bfloat16", "float32", "float16")):
            return name
        raise pickle.UnpicklingError(f"a LoRA state dict does not hold {module}.{name}")

    def persistent_load(self, pid: object) -> object:
        return None


def _bin_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    try:
        with zipfile.ZipFile(file) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if len(pickles) != 1:
                raise ValueError(f"{file} is not a torch.save archive (no single data.pkl)")
            with archive.open(pickles[0]) as f:
                state = _ShapeUnpickler(f).load()
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, AttributeError, TypeError) as error:
        raise ValueError(f"{file} is not a readable torch state dict: {error}") from None
    if not isinstance(state, dict) or not all(isinstance(v, _TensorShape) for v in state.values()):
        raise ValueError(f"{file} does not hold a state dict of tensors")
    return {str(k): v.size for k, v in state.items()}
