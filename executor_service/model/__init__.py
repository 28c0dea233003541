"""The Llama-family model: config, rotary embedding, decoder and checkpoint loader."""

from executor_service.model.config import SUPPORTED_ARCHITECTURES, ModelConfig
from executor_service.model.dtype import resolve_dtype
from executor_service.model.llama import LlamaForCausalLM
from executor_service.model.loader import load_model

__all__ = ["SUPPORTED_ARCHITECTURES", "LlamaForCausalLM", "ModelConfig", "load_model", "resolve_dtype"]
