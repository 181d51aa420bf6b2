"""Data modules: the shipped toys (digits, synthetic tokens) and text for real models, all resumable.

    DigitsDataModule / SyntheticTokensDataModule   the toy recipes' data (qat.data.digits, qat.data.synthetic)
    ResumableLoader                                 a DataLoader that resumes mid-epoch (qat.data.loading)

    default_corpus / read_corpus / read_documents   the text (qat.data.corpus)
    pack_tokens / TextDataModule                    causal-LM blocks (qat.data.text)
    split_sentences / SentenceDataModule            sentence-encoder batches (qat.data.sentences)
"""

from qat.data.corpus import default_corpus, read_corpus, read_documents, split_sentences
from qat.data.digits import DigitsDataModule
from qat.data.loading import ResumableLoader
from qat.data.sentences import SentenceDataModule
from qat.data.synthetic import SyntheticTokensDataModule
from qat.data.text import TextDataModule, pack_tokens

__all__ = [
    "DigitsDataModule",
    "ResumableLoader",
    "SentenceDataModule",
    "SyntheticTokensDataModule",
    "TextDataModule",
    "default_corpus",
    "pack_tokens",
    "read_corpus",
    "read_documents",
    "split_sentences",
]
