"""Corpus → SentencePiece tokenizer → sharded Megatron-format token binaries. Never imports torch."""
__version__ = "0.1.0"
