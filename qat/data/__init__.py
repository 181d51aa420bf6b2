"""Text data for real models: corpora (local files or Python's pydoc topics), packing, data modules.

    default_corpus / read_corpus / read_documents   the text (qat.data.corpus)
    pack_tokens / TextDataModule                    causal-LM blocks (qat.data.text)
    split_sentences / SentenceDataModule            sentence-encoder batches (qat.data.sentences)
"""

from qat.data.corpus import default_corpus, read_corpus, read_documents, split_sentences
from qat.data.sentences import SentenceDataModule
from qat.data.text import TextDataModule, pack_tokens

__all__ = ["SentenceDataModule", "TextDataModule", "default_corpus", "pack_tokens", "read_corpus", "read_documents",
           "split_sentences"]
