"""Evaluation records: the digits sweeps (`qat sweep`) and the Hugging Face smoke runs (no scripts here)."""
