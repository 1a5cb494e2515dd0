"""BERT and GPT models with transformers' structure, keys and numbers.

    gpt.py          GPT-1 / GPT-2, one file top to bottom: decoder, heads, losses, and their backward
    bert.py         BERT, one file top to bottom: encoder, heads, losses, and their backward
    pretrained.py   transformers' side: input checks, outputs, keys and layouts, tied aliases,
                    loading, saving, the sequence-classification loss selection
    config.py       configs (transformers' fields), checked on construction
"""
from .config import BertConfig, GPT2Config, OpenAIGPTConfig
from .pretrained import ARCHITECTURES, ModelOutput, PreTrainedModel, from_pretrained, register
from .bert import (BertModel, BertForPreTraining, BertForMaskedLM, BertForNextSentencePrediction,
                   BertForSequenceClassification, BertForTokenClassification, BertForQuestionAnswering)
from .gpt import (GPT2Model, GPT2LMHeadModel, GPT2ForSequenceClassification, GPT2DoubleHeadsModel,
                  OpenAIGPTModel, OpenAIGPTLMHeadModel, OpenAIGPTDoubleHeadsModel)

__all__ = ["ARCHITECTURES", "ModelOutput", "PreTrainedModel", "from_pretrained", "register",
           "BertConfig", "BertModel", "BertForPreTraining", "BertForMaskedLM", "BertForNextSentencePrediction",
           "BertForSequenceClassification", "BertForTokenClassification", "BertForQuestionAnswering",
           "GPT2Config", "OpenAIGPTConfig", "GPT2Model", "GPT2LMHeadModel", "GPT2ForSequenceClassification",
           "GPT2DoubleHeadsModel", "OpenAIGPTModel", "OpenAIGPTLMHeadModel", "OpenAIGPTDoubleHeadsModel"]
