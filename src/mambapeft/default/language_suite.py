"""The language suite: multiple-choice tasks as lm-evaluation-harness YAML + JSON lines test files,
and one mixed training file in the commonsense_170k format (instruction/input/output/answer).

A test item is scored on the prompt an instruction-tuned model was trained on: its `query` is the
Alpaca prompt of the item's instruction (language/data.py) followed by "the correct answer is", and
its choices are answer1..answerN, so the harness compares " answer1" ... " answerN" as continuations,
exactly the words the training outputs end with. `options` keeps the options' own texts.

Every item carries a `passage`: the source text it shows (a fortune, a gloss, the generated
question). The text corpus leaves out any document sharing a 6-word window with a test passage
(corpora.leaks), so no test item is in what pretraining reads."""
import json
import random
import re
from pathlib import Path

from ..io import atomic_path
from ..language.data import prompt
from .sources import SourceError

ANSWER = "the correct answer is"   # the training outputs' words before the answer's name
TOPICS = ["art", "computers", "food", "law", "love", "medicine", "politics", "science", "sports", "work"]
YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {name}.jsonl
output_type: multiple_choice
test_split: test
doc_to_text: '{{{{query}}}}'
doc_to_choice: '{{{{choices}}}}'
doc_to_target: label
target_delimiter: ' '
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def words(text):
    return re.findall(r"\w+", text.lower())


def _item(query, choices, answer, passage):
    return {"query": query, "choices": choices, "label": choices.index(answer), "passage": passage}


def _choices(rng, answer, pool, k):
    return rng.sample([answer] + rng.sample([p for p in pool if p != answer], k - 1), k)


def fortune_topic(fortunes, rng, n):
    """Topic of a fortune, 4 choices. Fortunes of 6 to 60 words, seen in one topic file only."""
    seen = {}
    for t, entries in fortunes.items():
        for e in entries:
            seen.setdefault(" ".join(words(e)), set()).add(t)
    topics = [t for t in TOPICS if t in fortunes] or sorted(fortunes)
    pool = [(e, t) for t in topics for e in fortunes[t]
            if 6 <= len(words(e)) <= 60 and len(seen[" ".join(words(e))]) == 1]
    rng.shuffle(pool)
    pool = [(" ".join(e.split()), t) for e, t in pool[:n]]   # the files' hard line breaks become spaces
    return [_item(f"Fortune: {e}\nTopic:", _choices(rng, t, topics, min(4, len(topics))), t, e) for e, t in pool]


def wordnet_word(glosses, rng, n):
    """The word for a definition, 4 choices; one-word entries with glosses of 6 words or more, each
    gloss and word used once."""
    by_gloss, used = {}, set()
    for w, g in glosses:
        if " " not in w and len(words(g)) >= 6 and w not in used:
            by_gloss.setdefault(g, w)
            used.add(w)
    pool = sorted(by_gloss.items())
    rng.shuffle(pool)
    vocab = [w for _, w in pool]
    return [_item(f"Definition: {g}\nWord:", _choices(rng, w, vocab, 4), w, g) for g, w in pool[:n]]


def compare(rng, n):
    """Which of two numbers is larger (two choices), generated."""
    out, seen = [], set()
    while len(out) < n:
        a, b = rng.sample(range(10, 1000), 2)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        q = f"Which of the two numbers is larger: {a} or {b}?"
        out.append(_item(q + "\nAnswer:", [str(a), str(b)], str(max(a, b)), q))
    return out


def count(rng, n):
    """How many times a letter occurs in a string of letters (choices 1 to 6), generated."""
    out, seen = [], set()
    while len(out) < n:
        letter, other = rng.sample("abcdefghijklmnopqrstuvwxyz", 2)
        k = rng.randint(1, 6)
        s = [letter] * k + [other] * rng.randint(1, 6)
        rng.shuffle(s)
        q = f"How many times does the letter {letter} appear in: {' '.join(s)}?"
        if q in seen:
            continue
        seen.add(q)
        out.append(_item(q + "\nAnswer:", [str(i) for i in range(1, 7)], str(k), q))
    return out


def instruction(item):
    """An item in the commonsense_170k format: the options named answer1..answerN."""
    names = [f"answer{i + 1}" for i in range(len(item["choices"]))]
    question = item["query"].rsplit("\n", 1)[0]   # without the trailing "Answer:" / "Topic:" / "Word:"
    options = " ".join(f"Answer{i + 1}: {c}" for i, c in enumerate(item["choices"]))
    return {"instruction": f"{question}\n\n{options}\n\nAnswer format: {'/'.join(names)}",
            "input": "", "output": f"{ANSWER} {names[item['label']]}", "answer": names[item["label"]]}


def test_item(item):
    """A test item as the harness scores it: the Alpaca prompt of its instruction up to the answer's
    name, the names answer1..answerN as choices (target_delimiter ' ' puts the space before each)."""
    rec = instruction(item)
    return {"query": prompt(rec) + ANSWER, "choices": [f"answer{i + 1}" for i in range(len(item["choices"]))],
            "label": item["label"], "options": item["choices"], "passage": item["passage"]}


def make_tasks(fortunes, glosses, n_train, n_test, seed):
    """{task: (train items, test items)}: disjoint, seeded."""
    rng = random.Random(seed)
    n = n_train + n_test
    tasks = {"fortune_topic": fortune_topic(fortunes, rng, n), "wordnet_word": wordnet_word(glosses, rng, n),
             "compare": compare(rng, n), "count": count(rng, n)}
    out = {}
    for name, items in tasks.items():
        if len(items) < n:
            raise SourceError(f"{name}: the source gives {len(items)} usable items, the suite needs {n} "
                              f"({n_train} train + {n_test} test); lower --train or --test-language")
        out[name] = (items[n_test:], items[:n_test])
    return out


def write_suite(out_dir, tasks, seed):
    """OUT/NAME.yaml + OUT/NAME.jsonl per task, and OUT/train.json (all tasks' training items, shuffled)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train = []
    for name, (tr, te) in tasks.items():
        with atomic_path(out_dir / f"{name}.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(test_item(r)) + "\n" for r in te))
        with atomic_path(out_dir / f"{name}.yaml") as tmp:
            tmp.write_text(YAML.format(name=name))
        train += [instruction(r) for r in tr]
    random.Random(seed).shuffle(train)
    with atomic_path(out_dir / "train.json") as tmp:
        tmp.write_text(json.dumps(train, indent=1) + "\n")
    return sorted(out_dir / f"{n}.yaml" for n in tasks)


def test_passages(suite_dir):
    """[(file:line, passage)] of every test item of a written suite."""
    out = []
    for f in sorted(Path(suite_dir).glob("*.jsonl")):
        for i, line in enumerate(f.read_text().splitlines(), 1):
            out.append((f"{f}:{i}", json.loads(line)["passage"]))
    return out
