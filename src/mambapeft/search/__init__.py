"""The paper's two-step hybrid PEFT search (METHODS.md §2) with Optuna: step 1 chooses which methods
to use at minimal sizes, step 2 tunes the chosen set; trials score the validation split only."""
import json
import logging
from pathlib import Path

from .config import load_search_config
from .runner import engine_runner
from .space import Space

__all__ = ["load_search_config", "run_search", "Space"]
log = logging.getLogger("mambapeft.search")


def run_search(cfg, step="both", test=True, runner=engine_runner):
    """Run (or resume, or join as one more worker) the search of config `cfg` (load_search_config);
    writes best.yaml, report.md, plots and, after step 2, the test scores. Returns the output paths."""
    import optuna
    from ..peft.inject import model_kind
    from .objective import Workspace
    from .report import write_best, write_report
    from .study import make_storage, step1, step2

    s, out = cfg["search"], Path(cfg["output_dir"])
    if s["threads"]:
        import torch
        torch.set_num_threads(s["threads"])
    out.mkdir(parents=True, exist_ok=True)
    workspace = Workspace(cfg, runner)
    space = Space.load(s["space"], model_kind(workspace.bases[0].model))
    storage = make_storage(s)
    studies = []
    if step in ("1", "both"):
        studies.append(step1(workspace, space, storage, s))
    if step in ("2", "both"):
        studies.append(step2(workspace, space, storage, s))
    if step == "2":   # the report shows both steps
        studies.insert(0, optuna.load_study(study_name=f"{s['study']}.step1", storage=storage))
    paths = {"best": write_best(cfg, studies[-1])}
    final = None
    if test and step != "1":
        final = _final(workspace, studies[-1], out)
    paths["report"] = write_report(cfg, studies, final)
    return paths


def _final(workspace, study, out):
    """Test scores of the best configuration, computed once (kept in final.json for reruns)."""
    best = study.best_trial
    path = out / "final.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("study") == study.study_name and saved.get("trial") == best.number:
            return saved
    log.info("training the best configuration of %s (trial %d) once for the test split", study.study_name,
             best.number)
    tasks = workspace.test_scores(best.user_attrs["methods"], out)
    return {"study": study.study_name, "trial": best.number, "tasks": tasks}
