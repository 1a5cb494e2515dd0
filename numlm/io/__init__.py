"""Checkpoints on disk: transformers' config.json + model.safetensors (single or sharded)."""
from .checkpoint import (read_json, read_config, config_text, save_model_files, load_safetensors, save_safetensors, check_folder_path,
                         nonfinite_tensors, NonFiniteWeightsWarning, read_generation_config, generation_config_text)

__all__ = ["read_json", "read_config", "config_text", "save_model_files", "load_safetensors", "save_safetensors", "check_folder_path",
           "nonfinite_tensors", "NonFiniteWeightsWarning", "read_generation_config", "generation_config_text"]
