"""The end-to-end recipe (teacher correction, pruning, distillation, evaluation, export) behind examples/prune_distill.py."""
