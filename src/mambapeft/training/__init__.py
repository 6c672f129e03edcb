"""The fine-tuning engine: trains any PeftModel on the batches a task supplies."""
from .task import TASKS, Task, build_task, register_task

__all__ = ["TASKS", "Task", "build_task", "register_task"]
