"""Deployment: ONNX Runtime, GGUF run by llama.cpp, generation speed, export / load memory."""
