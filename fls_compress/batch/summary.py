"""Batch outputs: ``results.jsonl`` (one row per job), ``summary.md`` and ``summary.csv``.

Every file is replaced atomically (written to a temporary file in the same directory, then
``os.replace``), so a batch killed at any moment leaves either the previous or the new version, never a
torn one. Rows are sorted with failures first, then by job name.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

RESULTS_FILE, SUMMARY_MD, SUMMARY_CSV = "results.jsonl", "summary.md", "summary.csv"

COLUMNS: tuple[tuple[str, str], ...] = (
    ("status", "status"), ("name", "job"), ("command", "command"), ("method", "method"),
    ("exit_code", "exit"), ("metrics.sparsity", "sparsity"), ("metrics.relative_l2_error", "rel L2 err"),
    ("metrics.cosine_similarity", "cosine"), ("metrics.top1_agreement", "top-1 agree"),
    ("metrics.accuracy_original", "acc orig"), ("metrics.accuracy_compressed", "acc new"),
    ("metrics.speedup_batch1", "speed-up b1"), ("metrics.speedup_eval_batch", "speed-up eval"),
    ("input_bytes", "in bytes"), ("output_bytes", "out bytes"), ("wall_s", "wall s"),
    ("peak_rss_mib", "peak MiB"), ("error", "error"),
)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(data: Any, path: str | os.PathLike[str]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, allow_nan=False, default=str) + "\n")


def sort_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Failures first, then successes; by job name within each group."""
    return sorted(rows, key=lambda r: (r.get("status") == "ok", str(r.get("name"))))


def read_results(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """Rows of an existing ``results.jsonl`` by job name (unreadable lines are ignored)."""
    rows: dict[str, dict[str, Any]] = {}
    try:
        text = Path(path).read_text()
    except OSError:
        return rows
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("name"), str):
            rows[row["name"]] = row
    return rows


def write_results(path: str | os.PathLike[str], rows: Iterable[dict[str, Any]]) -> None:
    lines = [json.dumps(r, sort_keys=True, allow_nan=False, default=str) for r in sort_rows(rows)]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def _get(row: dict[str, Any], dotted: str) -> Any:
    value: Any = row
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def summary_csv(rows: Iterable[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([key for key, _ in COLUMNS])
    for row in sort_rows(rows):
        writer.writerow(["" if _get(row, k) is None else _get(row, k) for k, _ in COLUMNS])
    return buf.getvalue()


def summary_markdown(rows: Iterable[dict[str, Any]], meta: dict[str, Any]) -> str:
    rows = sort_rows(rows)
    failed = [r for r in rows if r.get("status") != "ok"]
    lines = [
        f"# Batch summary: {meta.get('manifest', '')}",
        "",
        f"{len(rows)} jobs: {len(rows) - len(failed)} ok, {len(failed)} failed"
        + (f"; {meta['reused']} reused from a previous run" if meta.get("reused") else "")
        + (f"; executor {meta['executor']}, {meta['workers']} workers" if meta.get("executor") else "")
        + (f", batch wall time {meta['wall_s']:.1f}s" if isinstance(meta.get("wall_s"), (int, float)) else ""),
        "",
    ]
    if failed:
        lines += ["## Failed", ""]
        lines += [f"- **{r['name']}** ({r.get('status')}, exit {_fmt(r.get('exit_code'))}): {r.get('error')}"
                  f" - log: `{r['name']}/job.log`" for r in failed]
        lines.append("")
    lines += ["## Jobs", "", "| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [_fmt(_get(row, k)).replace("|", "\\|").replace("\n", " ") for k, _ in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(out_dir: Path, rows: Iterable[dict[str, Any]], meta: dict[str, Any]) -> None:
    """(Re)write results.jsonl, summary.csv and summary.md in ``out_dir``, each atomically."""
    rows = list(rows)
    write_results(out_dir / RESULTS_FILE, rows)
    atomic_write_text(out_dir / SUMMARY_CSV, summary_csv(rows))
    atomic_write_text(out_dir / SUMMARY_MD, summary_markdown(rows, meta))
