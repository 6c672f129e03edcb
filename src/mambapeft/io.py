"""Safe, atomic file helpers shared by model checkpoints, adapters and results."""
import json
import os
import pickle
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class CheckpointError(ValueError):
    """A file that cannot be used as asked; the message names the file and what was expected."""


@contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes owner-only files; keep the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def write_safetensors(path, tensors, metadata=None):
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def resolve_dir(name_or_path, patterns=("*.json", "*.safetensors", "*.bin", "*.model", "*.txt")):
    """A local directory as is; anything shaped like "owner/name" is a hub id fetched with huggingface_hub
    (its local cache is used offline)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path}: expected a directory, got a file")
    name = str(name_or_path)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise CheckpointError(f"{name}: no such directory")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(name, allow_patterns=list(patterns)))
    except Exception as e:
        hint = (" HF_HUB_OFFLINE is set and the files are not in the local hub cache: pass a local directory."
                if os.environ.get("HF_HUB_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE") else "")
        raise CheckpointError(f"{name}: not a local directory, and the hub download failed "
                              f"({type(e).__name__}).{hint}") from None


def read_weights(path, allowed_globals=()):
    """Tensors from a .safetensors file, or from a .bin/.pth/.pt read with weights_only=True
    (`allowed_globals`: extra plain classes that file format is known to hold)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if path.suffix in (".bin", ".pth", ".pt"):
        try:
            with torch.serialization.safe_globals(list(allowed_globals)):
                return torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise CheckpointError(
                f"{path}: refusing to unpickle: this file holds objects other than tensors and plain "
                f"containers, which could run arbitrary code ({first}). Convert it to safetensors with "
                "code you trust.") from None
        except (RuntimeError, EOFError) as e:
            raise CheckpointError(f"{path}: not a readable PyTorch weights file ({e})") from None
    raise CheckpointError(f"{path}: unknown weights format (expected .safetensors, .bin, .pth or .pt)")
