"""The language protocol: instruction data (data.py), zero-shot multiple choice (multiple_choice.py),
the lm-evaluation-harness model (harness.py) and the "language" training task (task.py)."""
