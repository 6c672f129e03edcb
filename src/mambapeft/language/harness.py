"""lm-evaluation-harness model `mambapeft`: any harness task on a Mamba with any adapter.

    mambapeft lm-eval --model mambapeft --model_args pretrained=DIR,adapter=DIR,dtype=bfloat16 --tasks piqa

lm-eval 0.4.13 finds models only in its own registry (no entry points for outside packages), so
`mambapeft lm-eval` imports this module, which registers the model, and hands every argument to the
harness's own command line. Log-likelihoods come from the same batched scorer as `mambapeft eval`."""
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from . import multiple_choice

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "auto": None}


def load(pretrained, adapter=None, dtype=None, device="cpu", tokenizer=None):
    """(model in eval mode, tokenizer) from a model directory or hub id and an optional adapter directory."""
    from ..models import MambaForCausalLM
    from ..models.checkpoint import load_tokenizer
    from ..peft import PeftModel
    model = MambaForCausalLM.from_pretrained(pretrained)
    if adapter:
        model = PeftModel.from_pretrained(model, adapter)
    model = model.to(device=device, dtype=dtype).eval()
    return model, load_tokenizer(tokenizer or pretrained)


@register_model("mambapeft")
class MambaPeftLM(TemplateLM):
    def __init__(self, pretrained=None, adapter=None, dtype="float32", device="cpu", batch_size=32,
                 tokenizer=None, max_length=2048, model=None, max_batch_size=None, **unknown):
        super().__init__()
        from ..cli import UsageError
        if unknown:   # a misspelt adapter= must not quietly evaluate the base model
            raise UsageError(f"--model_args: unknown setting {sorted(unknown)[0]!r}; expected pretrained, adapter, "
                             "dtype, tokenizer, max_length")
        if model is None:
            if pretrained is None:
                raise UsageError("--model_args: expected pretrained=DIR (a Mamba model directory or hub id)")
            if str(dtype) not in DTYPES:
                raise UsageError(f"--model_args: dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
            if not device or (str(device).startswith("cuda") and not torch.cuda.is_available()):
                device = "cpu"   # the harness's --device defaults to cuda; its HF model falls back the same way
            model, tokenizer = load(pretrained, adapter, DTYPES[str(dtype)], device, tokenizer)
        elif tokenizer is None or isinstance(tokenizer, str):
            raise ValueError("MambaPeftLM(model=...) also needs the tokenizer object")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 32   # "auto" -> our default
        self.max_length = int(max_length)

    # ---- what TemplateLM asks for ----------------------------------------------------------------
    @property
    def eot_token_id(self):
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self):
        t = self.tokenizer
        return t.bos_token_id if t.bos_token_id is not None else t.eos_token_id

    @property
    def tokenizer_name(self):
        return getattr(self.tokenizer, "name_or_path", "mambapeft").replace("/", "__")

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens, **kwargs):
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _pad_id(self):
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.prefix_token_id

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
        pairs = [(list(c), list(k)) for _, c, k in requests]
        return multiple_choice.score(self.model, pairs, self.batch_size, self._pad_id())

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        """Whole-text log-likelihood in windows of max_length tokens, split as the harness's HF model splits."""
        windows, owner = [], []
        for i, req in enumerate(requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(req.args[0]), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, multiple_choice.score(self.model, windows, self.batch_size, self._pad_id())):
            totals[i] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm=False):
        """Greedy (or sampled) continuations, cut at the first stop string; left-padded batches."""
        out = []
        for start in range(0, len(requests), self.batch_size):
            group = requests[start:start + self.batch_size]
            kwargs = [dict(r.args[1]) for r in group]
            if any(k != kwargs[0] for k in kwargs):   # one at a time when the settings differ
                for r in group:
                    out.extend(self._generate([r.args[0]], dict(r.args[1])))
            else:
                out.extend(self._generate([r.args[0] for r in group], kwargs[0]))
        return out

    def _generate(self, contexts, kwargs):
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kwargs.pop("max_gen_toks", 256))
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 1.0) or 1.0)
        encoded = [self.tok_encode(c)[-(self.max_length - max_new):] or [self.prefix_token_id] for c in contexts]
        T = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), T), self._pad_id(), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, e in enumerate(encoded):
            ids[r, T - len(e):] = torch.tensor(e)
            mask[r, T - len(e):] = 1
        device = next(self.model.parameters()).device
        rows = self.model.generate(ids.to(device), mask.to(device), max_new_tokens=max_new, do_sample=do_sample,
                                   temperature=temperature, eos_token_id=self.eot_token_id,
                                   pad_token_id=self._pad_id())
        texts = []
        for ctx, row in zip(contexts, rows[:, T:].tolist()):
            text = self.tok_decode(row)   # EOS and the padding after it are special tokens: dropped
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            texts.append(text)
            self.cache_hook.add_partial("generate_until", (ctx, {"until": until}), text)
        return texts
