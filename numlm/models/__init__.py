"""BERT and GPT models with transformers' structure, keys and numbers."""
from .base import ARCHITECTURES, ModelOutput, PreTrainedModel, from_pretrained, register
from .bert import (BertConfig, BertModel, BertForPreTraining, BertForMaskedLM, BertForNextSentencePrediction,
                   BertForSequenceClassification, BertForTokenClassification, BertForQuestionAnswering)
from .gpt import (GPT2Config, OpenAIGPTConfig, GPT2Model, GPT2LMHeadModel, GPT2ForSequenceClassification,
                  GPT2DoubleHeadsModel, OpenAIGPTModel, OpenAIGPTLMHeadModel, OpenAIGPTDoubleHeadsModel)

__all__ = ["ARCHITECTURES", "ModelOutput", "PreTrainedModel", "from_pretrained", "register",
            "BertConfig", "BertModel", "BertForPreTraining", "BertForMaskedLM", "BertForNextSentencePrediction",
            "BertForSequenceClassification", "BertForTokenClassification", "BertForQuestionAnswering",
            "GPT2Config", "OpenAIGPTConfig", "GPT2Model", "GPT2LMHeadModel", "GPT2ForSequenceClassification",
            "GPT2DoubleHeadsModel", "OpenAIGPTModel", "OpenAIGPTLMHeadModel", "OpenAIGPTDoubleHeadsModel"]
