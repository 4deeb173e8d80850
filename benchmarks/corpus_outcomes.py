"""Print the outcome of ``onnxeps score`` on every file of the ONNX corpus as Markdown.

Each file is scored (defined epsilon), undefined (exit 0, null epsilon) or rejected
(exit 1), grouped by what the file is and by the cause of each rejection.
The tables of docs/robustness.md come from this script.

Usage:

    python benchmarks/corpus_outcomes.py [--corpus DIR] [--jobs N]
    python benchmarks/corpus_outcomes.py --outcomes FILE

Without ``--outcomes`` the script runs the corpus itself, ``--jobs`` files at a time.
With it, the script reads the runs that tests/test_corpus_files.py wrote to FILE when
``ONNXEPS_CORPUS_OUTCOMES=FILE`` was set. Both run the same command on each file:
``onnxeps score FILE --batch-size 8 --format json --timeout 60``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SCORE_OPTIONS = ["--batch-size", "8", "--format", "json", "--timeout", "60"]
HANG_SECONDS = 180

# Each file is counted once, under the first group whose tags it carries.
GROUPS = [
    ("broken or invalid files", {"negative", "invalid", "legacy-ir"}),
    ("quantized", {"quantized"}),
    ("classic ML (trees, linear models)", {"classic-ml"}),
    ("external data", {"external-data"}),
    ("control flow (If, Loop, Scan)", {"control-flow"}),
    ("recurrent (LSTM, GRU, RNN)", {"rnn-op"}),
    ("attention and transformers", {"attention", "transformer"}),
    ("CNNs", {"cnn", "single-layer"}),
    ("MLPs", {"mlp"}),
]
OTHER_GROUP = "other (single operators, hand-built graphs)"

# Rejection causes, matched in this order against the one error line.
CAUSES = [
    # run_passes words an unexpected exception inside a pass as "rewrite pass X failed".
    ("internal error (a defect)", r"internal error|rewrite pass .* failed"),
    ("timed out", r"timed out"),
    ("not a valid ONNX file", r"not a valid ONNX model|file not found|not a file"),
    ("missing external data", r"external data"),
    ("quantized weights", r"quantized"),
    ("no constant weights", r"no constant weights"),
    ("cannot synthesise an integer input", r"cannot synthesise integer input"),
    ("no synthetic batch for the input", r"no synthetic batch"),
    ("rewrite not possible (old opset, unknown types)", r"cannot be rewritten"),
    ("ONNX Runtime cannot build a session", r"could not build a session"),
    ("ONNX Runtime run failed", r"failed to run the model"),
    ("out of memory", r"out of memory"),
]


def onnxeps_command() -> list[str]:
    script = Path(sys.executable).with_name("onnxeps")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from onnxeps.cli import main; main()"]


def default_corpus() -> Path:
    data = os.environ.get("ONNXEPS_DATA")
    root = Path(data) if data else Path(__file__).resolve().parents[2] / "shared" / "data"
    return root / "onnx-corpus"


def read_manifest(corpus: Path) -> list[dict[str, str]]:
    with open(corpus / "MANIFEST.csv", newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


def run_file(corpus: Path, path: str) -> dict:
    """Score one file in a subprocess and return the fields the test module writes."""
    command = [*onnxeps_command(), "score", str(corpus / path), *SCORE_OPTIONS]
    started = time.monotonic()
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=HANG_SECONDS, check=False
        )
        run = {"returncode": done.returncode, "stdout": done.stdout, "stderr": done.stderr}
        run["hung"] = False
    except subprocess.TimeoutExpired:
        run = {"returncode": None, "stdout": "", "stderr": "", "hung": True}
    run.update(path=path, command=command, seconds=time.monotonic() - started)
    return run


def run_corpus(corpus: Path, rows: list[dict[str, str]], jobs: int) -> list[dict]:
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(lambda row: run_file(corpus, row["path"]), rows))


def read_outcomes(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as stream:
        return [json.loads(line) for line in stream if line.strip()]


def group_of(row: dict[str, str]) -> str:
    tags = set(row["categories"].split(";"))
    for name, group_tags in GROUPS:
        if tags & group_tags:
            return name
    return OTHER_GROUP


def error_line(run: dict) -> str:
    lines = [line for line in run["stderr"].splitlines() if line.startswith("error:")]
    return lines[-1] if lines else (run["stderr"].strip().splitlines() or ["(no message)"])[-1]


def cause_of(line: str) -> str:
    for name, pattern in CAUSES:
        if re.search(pattern, line):
            return name
    return "other"


def classify(run: dict) -> tuple[str, str]:
    """Return (outcome, detail): scored, undefined (with reason) or rejected (cause)."""
    if run["hung"]:
        return "rejected", "hang (no exit)"
    if run["returncode"] == 0:
        record = json.loads(run["stdout"].strip().splitlines()[0])
        if record["epsilon"] is None:
            return "undefined", re.sub(r"\(.*\)", "(...)", record["reason"])
        return "scored", ""
    if run["returncode"] == 1:
        return "rejected", cause_of(error_line(run))
    return "rejected", f"exit code {run['returncode']} (a defect)"


def extra_stderr_lines(run: dict) -> int:
    """Count stderr lines beyond the one error line of a rejected file."""
    if run["returncode"] != 1:
        return 0
    return max(0, len([line for line in run["stderr"].splitlines() if line.strip()]) - 1)


def markdown(
    rows: list[dict[str, str]], runs: list[dict], command: str, per_file: bool
) -> str:
    by_path = {run["path"]: run for run in runs}
    outcomes = {row["path"]: classify(by_path[row["path"]]) for row in rows}
    lines = [
        f"Command: `{command}`, one subprocess per file.",
        "",
        f"Versions: {_versions()}. Date: {datetime.date.today().isoformat()}.",
        "",
    ]
    lines += _group_table(rows, outcomes)
    lines += _tag_table(rows, outcomes)
    lines += _cause_table(rows, outcomes, by_path)
    lines += _undefined_table(outcomes)
    if per_file:
        lines += _file_table(rows, outcomes)
    return "\n".join(lines) + "\n"


def _versions() -> str:
    import onnx
    import onnxruntime

    return (
        f"onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"Python {sys.version.split()[0]}"
    )


def _count_row(label: str, files: list[str], outcomes) -> str:
    counts = Counter(outcomes[path][0] for path in files)
    return (
        f"| {label} | {len(files)} | {counts['scored']} | {counts['undefined']} | "
        f"{counts['rejected']} |"
    )


def _group_table(rows, outcomes) -> list[str]:
    groups: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        groups[group_of(row)].append(row["path"])
    order = [name for name, _ in GROUPS] + [OTHER_GROUP]
    lines = [
        "### By kind of model",
        "",
        "Each file counts once, under the first kind in this table that its MANIFEST tags name.",
        "",
        "| kind | files | scored | undefined | rejected |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [_count_row(name, groups[name], outcomes) for name in order if groups[name]]
    lines.append(_count_row("**all**", [row["path"] for row in rows], outcomes))
    return lines + [""]


def _tag_table(rows, outcomes) -> list[str]:
    tags: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        for tag in row["categories"].split(";"):
            tags[tag].append(row["path"])
    lines = [
        "### By MANIFEST tag",
        "",
        "A file counts under each of its tags.",
        "",
        "| tag | files | scored | undefined | rejected |",
        "|---|---:|---:|---:|---:|",
    ]
    for tag in sorted(tags, key=lambda t: (-len(tags[t]), t)):
        lines.append(_count_row(tag, tags[tag], outcomes))
    return lines + [""]


def _cause_table(rows, outcomes, by_path) -> list[str]:
    causes: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        outcome, detail = outcomes[row["path"]]
        if outcome == "rejected":
            causes[detail].append(row["path"])
    lines = [
        "### Rejection causes",
        "",
        "| cause | files | example file | extra stderr lines |",
        "|---|---:|---|---:|",
    ]
    for cause in sorted(causes, key=lambda c: (-len(causes[c]), c)):
        paths = causes[cause]
        extra = sum(extra_stderr_lines(by_path[path]) for path in paths)
        lines.append(f"| {cause} | {len(paths)} | `{paths[0]}` | {extra} |")
    return lines + [""]


def _undefined_table(outcomes) -> list[str]:
    reasons = Counter(detail for outcome, detail in outcomes.values() if outcome == "undefined")
    lines = ["### Reasons for an undefined epsilon", "", "| reason | files |", "|---|---:|"]
    lines += [f"| {reason} | {count} |" for reason, count in reasons.most_common()]
    return lines + [""]


def _file_table(rows, outcomes) -> list[str]:
    lines = ["### Every file", "", "| file | kind | outcome | cause or reason |", "|---|---|---|---|"]
    for row in rows:
        outcome, detail = outcomes[row["path"]]
        lines.append(f"| `{row['path']}` | {group_of(row)} | {outcome} | {detail} |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=default_corpus(), help="Corpus folder (with MANIFEST.csv).")
    parser.add_argument("--outcomes", type=Path, help="JSON Lines file written by tests/test_corpus_files.py.")
    parser.add_argument("--jobs", type=int, default=2, help="Files scored at a time when running the corpus.")
    parser.add_argument("--per-file", action="store_true", help="Also print one row per file.")
    args = parser.parse_args()
    rows = read_manifest(args.corpus)
    runs = read_outcomes(args.outcomes) if args.outcomes else run_corpus(args.corpus, rows, args.jobs)
    missing = {row["path"] for row in rows} - {run["path"] for run in runs}
    if missing:
        sys.exit(f"error: no run for {len(missing)} corpus files, e.g. {sorted(missing)[0]}")
    command = "onnxeps score FILE " + " ".join(SCORE_OPTIONS)
    sys.stdout.write(markdown(rows, runs, command, args.per_file))


if __name__ == "__main__":
    main()
