"""Parameter-efficient fine-tuning, exact to peft and AdapterHub: LoRA (with rsLoRA, DoRA and trained
biases), IA3, bottleneck adapters (Houlsby double_seq_bn, Pfeiffer seq_bn), prompt tuning and prefix
tuning, every backward by hand.

    from numlm import peft
    pm = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                                    task_type="SEQ_CLS"))
    out = pm(input_ids=ids, attention_mask=mask, labels=y); pm.backward()
    pm.save_pretrained(d); pm = peft.PeftModel.from_pretrained(base_model, d); merged = pm.merge_and_unload()
"""
from .config import (LoraConfig, IA3Config, PromptTuningConfig, PrefixTuningConfig, BnConfig, SeqBnConfig, DoubleSeqBnConfig,
                     TASK_TYPES)
from .model import PeftModel, get_peft_model

__all__ = ["LoraConfig", "IA3Config", "PromptTuningConfig", "PrefixTuningConfig", "BnConfig", "SeqBnConfig", "DoubleSeqBnConfig",
           "TASK_TYPES", "PeftModel", "get_peft_model"]
