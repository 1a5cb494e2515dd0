"""Data: tokenizers (wrapping the `tokenizers` package), corpora, MLM/NSP/causal-LM batches."""
from .tokenizer import Tokenizer, BERT_SPECIALS, GPT_EOS
from .corpus import (read_texts, iter_texts, strip_markdown, play_text, shakespeare_texts, pydoc_texts,
                     default_corpus)
from .tasks import (classification_input, entailment_input, similarity_inputs, multiple_choice_inputs,
                    pack_choices)
from .pretrain import (
    IGNORE_INDEX, NSPPair, as_rng, mask_tokens, tokenize_documents, nsp_pairs, nsp_batch,
    bert_pretraining_batches, pack_documents, sample_blocks, causal_lm_batches, sequential_blocks,
    prepare, load_tokens, load_meta, load_document_starts, split_tokens, split_documents,
    TokenStream,
)

__all__ = [n for n in dir() if not n.startswith("_")]
