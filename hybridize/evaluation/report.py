"""Writing evaluation results: a console table, and JSON + markdown + PNG files in the output folder."""

from __future__ import annotations

import json
from pathlib import Path

# Rows of the fidelity table: report key -> (label, format)
FIDELITY_ROWS = {
    "kl_answer": ("KL(teacher || hybrid), answer tokens", "{:.4f}"),
    "kl_text": ("KL(teacher || hybrid), text tokens", "{:.4f}"),
    "agreement_answer": ("top-1 agreement, answer tokens", "{:.1%}"),
    "agreement_text": ("top-1 agreement, text tokens", "{:.1%}"),
    "teacher_perplexity": ("teacher perplexity, answers", "{:.2f}"),
    "hybrid_perplexity": ("hybrid perplexity, answers", "{:.2f}"),
}


def import_pyplot():
    """matplotlib's pyplot on the Agg backend (no display), or an error that says how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "The evaluation plots need matplotlib: pip install 'hybridize[eval]' (or matplotlib)."
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _bucket_labels(report: dict) -> list[str]:
    window = report["window"]
    return [f"{name} W" if window else name for name in report["buckets"]]


def fidelity_rows(report: dict) -> list[list[str]]:
    """Header and one row per metric: overall, then per position bucket; then per converted layer."""
    rows = [["metric", "all", *_bucket_labels(report)]]
    for key, (label, fmt) in FIDELITY_ROWS.items():
        metric = report["metrics"][key]
        rows.append([label, _cell(metric["all"], fmt), *(_cell(v, fmt) for v in metric["by_position"])])
    tokens = report["metrics"]["kl_text"]["tokens"]
    rows.append(["text tokens", str(sum(tokens)), *map(str, tokens)])
    for layer in report["layers"]:
        for key, fmt in (("relative_mse", "{:.4f}"), ("cosine", "{:.4f}")):
            metric = layer[key]
            label = f"layer {layer['layer']} ({layer['mixer']}) {key.replace('_', ' ')}"
            rows.append([label, _cell(metric["all"], fmt), *(_cell(v, fmt) for v in metric["by_position"])])
    return rows


def text_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    )


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows[1:]])


def plot_fidelity(report: dict, path: Path) -> None:
    """Agreement and KL by position bucket (left, middle) and each converted layer's relative MSE (right)."""
    plt = import_pyplot()
    labels = _bucket_labels(report)
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    for axis, keys, title in (
        (axes[0], ("agreement_answer", "agreement_text"), "top-1 agreement with the teacher"),
        (axes[1], ("kl_answer", "kl_text"), "KL(teacher || hybrid)"),
    ):
        for key in keys:
            values = [float("nan") if v is None else v for v in report["metrics"][key]["by_position"]]
            axis.plot(labels, values, marker="o", label=FIDELITY_ROWS[key][0].split(", ")[1])
        axis.set(title=title, xlabel="token position (W = sliding window)")
        axis.legend()
    layers = report["layers"]
    if layers:
        names = [str(layer["layer"]) for layer in layers]
        axes[2].bar(names, [layer["relative_mse"]["all"] or 0.0 for layer in layers])
        axes[2].set(title="mixer vs teacher attention: relative MSE", xlabel="layer")
    else:
        axes[2].set(title="no converted (mixer) layer")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_fidelity_report(report: dict, out: str | Path) -> None:
    """Print the table; write fidelity.json, fidelity.md and fidelity.png to `out`."""
    out = Path(out)
    rows = fidelity_rows(report)
    print(text_table(rows))
    out.mkdir(parents=True, exist_ok=True)
    (out / "fidelity.json").write_text(json.dumps(report, indent=2) + "\n")
    heading = (
        f"# Fidelity of {report.get('hybrid', 'the hybrid')} to {report.get('teacher', 'its teacher')}\n\n"
    )
    window = f"Sliding window W = {report['window']} tokens" if report["window"] else "No sliding window"
    samples = f"; {report['samples']} samples" if "samples" in report else ""
    (out / "fidelity.md").write_text(f"{heading}{window}{samples}.\n\n{markdown_table(rows)}\n")
    plot_fidelity(report, out / "fidelity.png")


def task_rows(results: dict) -> list[list[str]]:
    """Header and one row per task: each model's score, and the difference when two were compared."""
    models = list(results["models"])
    header = ["task", "metric", "samples", *models] + (["difference"] if len(models) == 2 else [])
    rows = [header]
    for task, entry in results["tasks"].items():
        scores = [results["models"][model][task]["score"] for model in models]
        row = [task, entry["metric"], str(entry["samples"]), *(f"{100 * s:.1f}" for s in scores)]
        if len(models) == 2:
            row.append(f"{100 * (scores[0] - scores[1]):+.1f}")
        rows.append(row)
    return rows


def write_task_report(results: dict, out: str | Path) -> None:
    """Print the table; write tasks.json (scores and every prediction) and tasks.md to `out`."""
    out = Path(out)
    rows = task_rows(results)
    print(text_table(rows))
    out.mkdir(parents=True, exist_ok=True)
    (out / "tasks.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "tasks.md").write_text(f"# Task accuracy (%)\n\n{markdown_table(rows)}\n")
