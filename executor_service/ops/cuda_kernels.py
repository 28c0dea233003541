"""The catalog of CUDA kernels in `kernels/`: sources and every instantiation the CUDA backend may launch.

Pure Python (no torch, no CuPy): the runtime loader and the CPU compile check both take their
sources, compiler options and name expressions from here, so what is checked is what runs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

KERNELS_DIR = Path(__file__).resolve().parents[2] / "kernels"
COMMON_HEADER = "common.cuh"
# Options shared by the runtime compile (CuPy) and the CPU check (NVRTC through ctypes).
COMPILE_OPTIONS: tuple[str, ...] = ("-std=c++17",)
# Architectures every instantiation must compile for: Ampere (A100) and Hopper (H100/H200).
CHECKED_ARCHS: tuple[str, ...] = ("sm_80", "sm_90")

# Storage dtype (torch name) -> the C++ type the kernels are instantiated with.
CUDA_TYPES: dict[str, str] = {"float32": "float", "float16": "pw_half", "bfloat16": "pw_bf16"}
ATTENTION_HEAD_DIMS: tuple[int, ...] = (16, 64, 128)
ATTENTION_BLOCK_SIZES: tuple[int, ...] = (8, 16, 32)
# Mirrors kPwAttentionMaxRows: a CTA holds at most this many (query token, head) rows of one KV head,
# so the GQA group (num_heads // num_kv_heads) can be at most this large.
ATTENTION_MAX_ROWS = 16
ATTENTION_THREADS = 128
CACHE_WRITE_THREADS = 128
BLOCK_COPY_THREADS = 256
# Mirrors kPwSgmvThreads, kPwSgmvTokens, kPwSgmvMaxRank and PwSgmvShape<T>::kChunk in sgmv.cu.
SGMV_THREADS = 128
SGMV_TOKENS_PER_CTA = 16
SGMV_MAX_RANK = 128
SGMV_VECTORS_PER_LANE = 2
# 16-byte copy words for whole blocks, 4-byte words as a fallback for odd block sizes.
BLOCK_COPY_WORDS: dict[int, str] = {16: "uint4", 4: "unsigned int"}


def vector_elements(dtype_name: str) -> int:
    """Elements of `dtype_name` in one 16-byte vector."""
    return 4 if dtype_name == "float32" else 8


def sgmv_chunk_elements(dtype_name: str) -> int:
    """Input features one shrink CTA covers."""
    return 32 * SGMV_VECTORS_PER_LANE * vector_elements(dtype_name)


_INCLUDE = re.compile(r'^#include "([^"]+)"[ \t]*$', re.MULTILINE)


def paste_includes(
    text: str, headers: Mapping[str, str] | None = None, seen: frozenset[str] = frozenset()
) -> str:
    """`text` with each `#include "name"` replaced by that header's text, recursively, each header once.

    Headers are read from `kernels/` unless `headers` gives a substitute text for the name (a host build
    of the kernels swaps `ptx.cuh` for plain C++ this way).
    """
    pasted = set(seen)

    def paste(match: re.Match[str]) -> str:
        name = match.group(1)
        if name in pasted:
            return ""
        pasted.add(name)
        if headers is not None and name in headers:
            header = headers[name]
        elif (KERNELS_DIR / name).is_file():
            header = (KERNELS_DIR / name).read_text(encoding="utf-8")
        else:
            raise ValueError(f"kernels include {name!r}, which is not in {KERNELS_DIR}")
        return paste_includes(header.replace("#pragma once\n", ""), headers, frozenset(pasted))

    return _INCLUDE.sub(paste, text)


@dataclass(frozen=True, slots=True)
class KernelFamily:
    """One `.cu` file and the name expressions of all its instantiations."""

    name: str
    source_file: str

    def source(self, headers: Mapping[str, str] | None = None) -> str:
        """The `.cu` text with its headers pasted in (self-contained for NVRTC); see `paste_includes`."""
        text = (KERNELS_DIR / self.source_file).read_text(encoding="utf-8")
        if f'#include "{COMMON_HEADER}"' not in text:
            raise ValueError(f"{self.source_file} must include {COMMON_HEADER}")
        return paste_includes(text, headers)


PAGED_ATTENTION = KernelFamily("paged_attention", "paged_attention.cu")
CACHE_WRITE = KernelFamily("cache_write", "cache_write.cu")
BLOCK_COPY = KernelFamily("block_copy", "block_copy.cu")
SGMV = KernelFamily("sgmv", "sgmv.cu")
FAMILIES: tuple[KernelFamily, ...] = (PAGED_ATTENTION, CACHE_WRITE, BLOCK_COPY, SGMV)


def attention_kernel(dtype_name: str, head_dim: int, block_size: int) -> str:
    return f"paged_attention_kernel<{CUDA_TYPES[dtype_name]}, {head_dim}, {block_size}>"


def attention_reduce_kernel(dtype_name: str, head_dim: int) -> str:
    return f"paged_attention_reduce_kernel<{CUDA_TYPES[dtype_name]}, {head_dim}>"


def write_kv_kernel(dtype_name: str) -> str:
    return f"write_kv_kernel<{CUDA_TYPES[dtype_name]}>"


def copy_blocks_kernel(word_bytes: int) -> str:
    return f"copy_blocks_kernel<{BLOCK_COPY_WORDS[word_bytes]}>"


def sgmv_shrink_kernel(dtype_name: str) -> str:
    return f"sgmv_shrink_kernel<{CUDA_TYPES[dtype_name]}>"


def sgmv_expand_kernel(dtype_name: str) -> str:
    return f"sgmv_expand_kernel<{CUDA_TYPES[dtype_name]}>"


def all_instantiations(family: KernelFamily) -> tuple[str, ...]:
    """Every name expression of `family` that the CUDA backend can ask for."""
    if family == PAGED_ATTENTION:
        names = [
            attention_kernel(dtype, head_dim, block_size)
            for dtype in CUDA_TYPES
            for head_dim in ATTENTION_HEAD_DIMS
            for block_size in ATTENTION_BLOCK_SIZES
        ]
        names += [
            attention_reduce_kernel(dtype, head_dim)
            for dtype in CUDA_TYPES
            for head_dim in ATTENTION_HEAD_DIMS
        ]
        return tuple(names)
    if family == CACHE_WRITE:
        return tuple(write_kv_kernel(dtype) for dtype in CUDA_TYPES)
    if family == BLOCK_COPY:
        return tuple(copy_blocks_kernel(word_bytes) for word_bytes in BLOCK_COPY_WORDS)
    if family == SGMV:
        return tuple(
            name for dtype in CUDA_TYPES for name in (sgmv_shrink_kernel(dtype), sgmv_expand_kernel(dtype))
        )
    raise ValueError(f"unknown kernel family {family.name!r}")
