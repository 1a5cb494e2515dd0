"""numlm: BERT and GPT in plain NumPy, every forward and backward pass written by hand."""
from . import ops, nn
from .gradcheck import gradcheck
from .kernels import numba_enabled, set_numba
from .models import from_pretrained, ModelOutput

__version__ = "0.1.0"
__all__ = ["ops", "nn", "gradcheck", "numba_enabled", "set_numba", "from_pretrained", "ModelOutput"]
