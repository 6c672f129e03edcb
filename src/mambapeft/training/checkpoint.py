"""Training checkpoints: everything a resumed run needs to continue bit for bit, no pickle.

    checkpoints/step-00000120/
      adapter_config.json, adapter_model.safetensors   the trainable tensors (PeftModel.save_pretrained)
      optimizer.safetensors                            AdamW moments and step counts, "state.<i>.<name>"
      optimizer.json                                   AdamW hyperparameters per group
      rng.json                                         python, numpy, torch (and CUDA) RNG states per rank
      state.json                                       step, epoch, data position, lr schedule, best score

A checkpoint is written in a hidden temporary directory that is renamed into place once complete,
so a kill at any moment leaves either the old set of checkpoints or the old set plus the new one."""
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from ..io import CheckpointError, read_json, read_weights, write_json, write_safetensors

PREFIX = "step-"


def rng_state():
    py = random.getstate()
    np_state = np.random.get_state()
    state = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state):
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def optimizer_files(optimizer):
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for i, s in sd["state"].items():
        for k, v in s.items():
            if torch.is_tensor(v):
                tensors[f"state.{i}.{k}"] = v
            else:
                scalars[f"{i}.{k}"] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def load_optimizer(optimizer, directory):
    tensors = read_weights(directory / "optimizer.safetensors")
    meta = read_json(directory / "optimizer.json")
    state = {}
    for key, v in tensors.items():
        _, i, k = key.split(".", 2)
        state.setdefault(int(i), {})[k] = v
    for key, v in meta["scalars"].items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = v
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    if len(groups) != len(optimizer.param_groups) or \
            any(len(a["params"]) != len(b["params"]) for a, b in zip(groups, optimizer.param_groups)):
        raise CheckpointError(f"{directory}: the optimizer state does not match this run's trainable tensors")
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save(run_dir, peft, optimizer, state, rng_states, keep):
    """Write checkpoints/step-N atomically, then drop all but the newest `keep`."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"{PREFIX}{state['step']:08d}"
    tmp = root / f".tmp-{final.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    peft.save_pretrained(tmp)
    tensors, meta = optimizer_files(optimizer)
    write_safetensors(tmp / "optimizer.safetensors", tensors)
    write_json(tmp / "optimizer.json", meta)
    write_json(tmp / "rng.json", {"ranks": rng_states})
    write_json(tmp / "state.json", state)
    if final.exists():             # the same step written again (a resumed run that saves at once)
        shutil.rmtree(final)
    tmp.rename(final)
    for old in checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def checkpoints(run_dir):
    """Complete checkpoints, oldest first (temporary directories of an interrupted write are not)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def latest(run_dir):
    found = checkpoints(run_dir)
    return found[-1] if found else None


def clean_partial(run_dir):
    root = Path(run_dir) / "checkpoints"
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p)


def load(directory, peft, optimizer, rank):
    """Restore adapter, optimizer and this rank's RNG; return the saved state dict."""
    weights = read_weights(directory / "adapter_model.safetensors")
    own = dict(peft.base_model.named_parameters())
    missing = sorted(set(peft.trainable_state_dict()) - set(weights))
    if missing or any(k not in own or own[k].shape != v.shape for k, v in weights.items()):
        raise CheckpointError(f"{directory}: the adapter does not match this run's methods (missing: {missing[:5]})")
    with torch.no_grad():
        for k, v in weights.items():
            own[k].copy_(v)
    load_optimizer(optimizer, directory)
    ranks = read_json(directory / "rng.json")["ranks"]
    if rank < len(ranks):
        set_rng_state(ranks[rank])
    return read_json(directory / "state.json")
