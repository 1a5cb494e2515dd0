"""numlm: BERT and GPT in plain NumPy, every forward and backward pass written by hand."""
from . import ops, nn
from .data import datasets
from .gradcheck import gradcheck
from .kernels import numba_enabled, set_numba
from .models import from_pretrained, ModelOutput
from .models.bert import (BertConfig, BertModel, BertForPreTraining, BertForMaskedLM, BertForNextSentencePrediction,
                          BertForSequenceClassification, BertForTokenClassification, BertForQuestionAnswering)
from .models.gpt import (GPT2Config, OpenAIGPTConfig, GPT2Model, GPT2LMHeadModel, GPT2ForSequenceClassification,
                         GPT2DoubleHeadsModel, OpenAIGPTModel, OpenAIGPTLMHeadModel, OpenAIGPTDoubleHeadsModel)

from .generate import generate  # noqa: E402  (the function; the module stays numlm.generate in sys.modules)
from .inference import fill_mask, predict, classify, sentence_embeddings, embed  # noqa: E402

__version__ = "0.1.0"
__all__ = ["ops", "nn", "datasets", "gradcheck", "generate", "fill_mask", "predict", "classify", "sentence_embeddings", "embed", "numba_enabled", "set_numba", "from_pretrained", "ModelOutput",
           "BertConfig", "BertModel", "BertForPreTraining", "BertForMaskedLM", "BertForNextSentencePrediction",
           "BertForSequenceClassification", "BertForTokenClassification", "BertForQuestionAnswering",
           "GPT2Config", "OpenAIGPTConfig", "GPT2Model", "GPT2LMHeadModel", "GPT2ForSequenceClassification",
           "GPT2DoubleHeadsModel", "OpenAIGPTModel", "OpenAIGPTLMHeadModel", "OpenAIGPTDoubleHeadsModel"]
