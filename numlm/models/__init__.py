"""BERT and GPT models with transformers' structure, keys and numbers."""
from .base import ARCHITECTURES, ModelOutput, PreTrainedModel, from_pretrained, register

__all__ = ["ARCHITECTURES", "ModelOutput", "PreTrainedModel", "from_pretrained", "register"]
