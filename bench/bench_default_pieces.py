"""Single-thread CPU seconds (time.process_time, so a busy machine barely changes them) of the pieces
of the two built-in jobs at the shipped models' shapes, on random stand-ins: one LoRA_p(X) training
step of the language job (16 records of the shipped train.json) and of the vision job (32 images),
the validation loss of 200 records, scoring the language suite's test items and 500 test images.
The jobs' times follow from the counts in examples/default_*.yaml.

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/bench_default_pieces.py
"""
import os
import tempfile
import time

import torch

from mambapeft.default import standin
from mambapeft.language.task import LanguageTask
from mambapeft.models import VisionMamba
from mambapeft.peft import get_peft_model, preset


def cpu(fn):
    t = time.process_time()
    out = fn()
    return time.process_time() - t, out


def step(peft, opt, loss):
    loss().backward()
    opt.step()
    opt.zero_grad()


def main():
    work = tempfile.mkdtemp(prefix="mambapeft-bench-pieces-")
    lm_dir, vim_dir = standin.language_model(os.path.join(work, "lm")), standin.vim(os.path.join(work, "vim"))
    task = LanguageTask({"type": "language", "suite": "default", "validation_size": 200, "eval_batch_size": 32})
    peft = get_peft_model(task.load_model({"path": str(lm_dir)}), preset("lora_X"))
    t_tok, train = cpu(task.train_set)
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-3)
    peft.train()
    steps = []
    for k in range(4):
        batch = task.collate(train[16 * k:16 * (k + 1)])
        steps.append(cpu(lambda: step(peft, opt, lambda: (lambda s, c: s / c)(*task.loss(peft, batch))))[0])
    peft.eval()
    with torch.no_grad():
        t_val, _ = cpu(lambda: task.validation_loss(peft))
        t_test, _ = cpu(lambda: task.task_metrics(peft))
    print(f"language: tokenize {len(train)} records {t_tok:.1f} s; training step (16 records) "
          f"{sum(steps[1:]) / 3:.2f} s; validation loss (200 records) {t_val:.1f} s; "
          f"scoring the {sum(len(t.eval_docs) for t in task.eval_tasks())} test items {t_test:.1f} s")
    vim = get_peft_model(VisionMamba.from_pretrained(vim_dir, num_classes=10, img_size=32), preset("lora_X", "vim"))
    opt = torch.optim.AdamW([p for p in vim.parameters() if p.requires_grad], lr=1e-3)
    vim.train()
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    steps = [cpu(lambda: step(vim, opt, lambda: torch.nn.functional.cross_entropy(vim(x), y)))[0] for _ in range(3)]
    vim.eval()
    with torch.no_grad():
        t_eval = sum(cpu(lambda: vim(torch.randn(250, 3, 32, 32)))[0] for _ in range(2))
    print(f"vision: training step (32 images) {sum(steps[1:]) / 2:.2f} s; scoring 500 test images {t_eval:.1f} s")
    print(f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
