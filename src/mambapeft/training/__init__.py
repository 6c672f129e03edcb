"""The fine-tuning engine: trains any PeftModel on the batches a task supplies."""
from .config import load_config
from .task import TASKS, Task, build_task, register_task
from .trainer import TrainingError, train

__all__ = ["TASKS", "Task", "TrainingError", "build_task", "load_config", "register_task", "train"]
