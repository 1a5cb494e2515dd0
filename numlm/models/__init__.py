"""BERT and GPT models with transformers' structure, keys and numbers.

    config.py       configs (transformers' fields), checked on construction
    gpt_core.py     GPT-1 / GPT-2 math: blocks, decoder forward and backward
    bert_core.py    BERT math: layers, encoder forward and backward
    heads.py        heads and losses, shared by both families
    checks.py       input checks of the transformers-facing classes
    pretrained.py   transformers' side: keys and layouts, tied aliases, loading, saving, outputs
    gpt.py, bert.py the classes transformers names (GPT2LMHeadModel, BertForMaskedLM, ...)
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
