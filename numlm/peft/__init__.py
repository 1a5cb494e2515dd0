"""Parameter-efficient fine-tuning, exact to peft and AdapterHub: LoRA, bottleneck adapters
(Houlsby double_seq_bn, Pfeiffer seq_bn), prompt tuning and prefix tuning, every backward by hand."""
