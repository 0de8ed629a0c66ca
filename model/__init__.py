"""The Qwen2 decoder, its config, and HF-layout checkpoint loading/saving."""

from model.config import Qwen2Config
from model.errors import UserError
from model.loading import (default_device, load_model, load_reward_model, recover_interrupted_saves, resolve_dtype,
                           resolve_model_dir, save_model)
from model.qwen2 import KVCache, Qwen2ForCausalLM, Qwen2ForSequenceClassification

__all__ = ["Qwen2Config", "UserError", "Qwen2ForCausalLM", "Qwen2ForSequenceClassification", "KVCache", "load_model",
           "load_reward_model", "save_model", "resolve_model_dir", "resolve_dtype", "default_device",
           "recover_interrupted_saves"]
