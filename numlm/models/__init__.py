"""BERT and GPT models with transformers' structure, keys and numbers.

    gpt.py          GPT-1 / GPT-2, one file top to bottom: decoder, heads, losses, and their backward
    bert.py         BERT, one file top to bottom: encoder, heads, losses, and their backward
    roberta.py      RoBERTa: bert.py's layers, RoBERTa's positions and heads
    distilbert.py   DistilBERT, one file top to bottom: its own layer names, heads, and their backward
    pretrained.py   transformers' side: input checks, outputs, keys and layouts, tied aliases,
                    loading, saving, the sequence-classification loss selection
    config.py       configs (transformers' fields), checked on construction
"""
from .config import BertConfig, GPT2Config, OpenAIGPTConfig, RobertaConfig, DistilBertConfig
from .pretrained import ARCHITECTURES, ModelOutput, PreTrainedModel, from_pretrained, register
from .bert import (BertModel, BertForPreTraining, BertForMaskedLM, BertForNextSentencePrediction,
                   BertForSequenceClassification, BertForTokenClassification, BertForQuestionAnswering)
from .roberta import (RobertaModel, RobertaForMaskedLM, RobertaForSequenceClassification,
                      RobertaForTokenClassification, RobertaForQuestionAnswering)
from .distilbert import (DistilBertModel, DistilBertForMaskedLM, DistilBertForSequenceClassification,
                         DistilBertForTokenClassification, DistilBertForQuestionAnswering)
from .gpt import (GPT2Model, GPT2LMHeadModel, GPT2ForSequenceClassification, GPT2DoubleHeadsModel,
                  OpenAIGPTModel, OpenAIGPTLMHeadModel, OpenAIGPTDoubleHeadsModel)

__all__ = ["ARCHITECTURES", "ModelOutput", "PreTrainedModel", "from_pretrained", "register",
           "BertConfig", "BertModel", "BertForPreTraining", "BertForMaskedLM", "BertForNextSentencePrediction",
           "BertForSequenceClassification", "BertForTokenClassification", "BertForQuestionAnswering",
           "GPT2Config", "OpenAIGPTConfig", "GPT2Model", "GPT2LMHeadModel", "GPT2ForSequenceClassification",
           "GPT2DoubleHeadsModel", "OpenAIGPTModel", "OpenAIGPTLMHeadModel", "OpenAIGPTDoubleHeadsModel",
           "RobertaConfig", "RobertaModel", "RobertaForMaskedLM", "RobertaForSequenceClassification",
           "RobertaForTokenClassification", "RobertaForQuestionAnswering",
           "DistilBertConfig", "DistilBertModel", "DistilBertForMaskedLM", "DistilBertForSequenceClassification",
           "DistilBertForTokenClassification", "DistilBertForQuestionAnswering"]
