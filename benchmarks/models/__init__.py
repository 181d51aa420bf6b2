"""Real Hugging Face models: the SmolLM2 and MiniLM recipes, their summaries, embedding agreement scripts."""
