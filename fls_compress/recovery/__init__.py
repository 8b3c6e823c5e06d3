"""Recovery after pruning: gradual pruning on a sparsity schedule with distillation fine-tuning (masks fixed)."""
