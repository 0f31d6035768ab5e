"""Evaluation: batched greedy generation, refusal judges, metrics and reports."""
