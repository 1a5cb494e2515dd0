"""numlm: BERT and GPT in plain NumPy, every forward and backward pass written by hand."""
from . import ops, nn
from .nn import no_grad
from .data import datasets
from .gradchecking import gradcheck
from .kernels import numba_enabled, set_numba
from .models import (from_pretrained, ModelOutput, BertConfig, BertModel, BertForPreTraining, BertForMaskedLM,
                     BertForNextSentencePrediction, BertForSequenceClassification, BertForTokenClassification,
                     BertForQuestionAnswering, GPT2Config, OpenAIGPTConfig, GPT2Model, GPT2LMHeadModel,
                     GPT2ForSequenceClassification, GPT2DoubleHeadsModel, OpenAIGPTModel, OpenAIGPTLMHeadModel,
                     OpenAIGPTDoubleHeadsModel, RobertaConfig, RobertaModel, RobertaForMaskedLM,
                     RobertaForSequenceClassification, RobertaForTokenClassification, RobertaForQuestionAnswering,
                     DistilBertConfig, DistilBertModel, DistilBertForMaskedLM, DistilBertForSequenceClassification,
                     DistilBertForTokenClassification, DistilBertForQuestionAnswering)

from .decoding import generate  # the function; the module is numlm.decoding
from .inference import fill_mask, predict, classify, tag, answer, sentence_embeddings, embed

__version__ = "0.1.0"
__all__ = ["ops", "nn", "no_grad", "datasets", "gradcheck", "generate", "fill_mask", "predict", "classify", "tag", "answer", "sentence_embeddings", "embed", "numba_enabled", "set_numba", "from_pretrained", "ModelOutput",
           "BertConfig", "BertModel", "BertForPreTraining", "BertForMaskedLM", "BertForNextSentencePrediction",
           "BertForSequenceClassification", "BertForTokenClassification", "BertForQuestionAnswering",
           "GPT2Config", "OpenAIGPTConfig", "GPT2Model", "GPT2LMHeadModel", "GPT2ForSequenceClassification",
           "GPT2DoubleHeadsModel", "OpenAIGPTModel", "OpenAIGPTLMHeadModel", "OpenAIGPTDoubleHeadsModel",
           "RobertaConfig", "RobertaModel", "RobertaForMaskedLM", "RobertaForSequenceClassification",
           "RobertaForTokenClassification", "RobertaForQuestionAnswering",
           "DistilBertConfig", "DistilBertModel", "DistilBertForMaskedLM", "DistilBertForSequenceClassification",
           "DistilBertForTokenClassification", "DistilBertForQuestionAnswering"]
