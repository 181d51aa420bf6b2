"""Training cost and quality: QAT step time and memory, distillation loss memory, sharding, KD and pruning."""
