"""Presenting a stats report: rich terminal table, JSON, Markdown and PNG plots."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

# Paper Table 1 (PixArt-alpha, arXiv 2310.00426), ~11.2M captions each, NLTK nouns.
PAPER_TABLE1 = [
    {"name": "LAION", "valid_nouns": 210_000, "distinct_nouns": 2_461_000, "vn_dn": 0.085, "total_nouns": 72.0e6, "nouns_per_caption": 6.4},
    {"name": "LAION-LLaVA", "valid_nouns": 85_000, "distinct_nouns": 646_000, "vn_dn": 0.133, "total_nouns": 233.9e6, "nouns_per_caption": 20.9},
    {"name": "SAM-LLaVA", "valid_nouns": 23_000, "distinct_nouns": 124_000, "vn_dn": 0.186, "total_nouns": 327.9e6, "nouns_per_caption": 29.3},
    {"name": "Internal", "valid_nouns": 152_000, "distinct_nouns": 582_000, "vn_dn": 0.261, "total_nouns": 136.6e6, "nouns_per_caption": 12.2},
]
PAPER_NOTE = "paper Table 1: ~11.2M captions each, NLTK nouns; VN/DN grows with sample size"


def _num(n: float) -> str:
    if n >= 1e5 and n < 1e6:
        return f"{n / 1e3:.0f}K"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    if n >= 1e4:
        return f"{n / 1e3:.0f}K"
    return f"{n:,.0f}"


def _matched(d: dict[str, Any]) -> str:
    m = d.get("size_matched")
    if not m:
        return "n/a" if "size_matched" in d else "-"
    if m["repeats"] == 1:
        return f"{m['vn_dn_mean']:.1%} (all)"
    return f"{m['vn_dn_mean']:.1%} ± {m['vn_dn_sd']:.1%}"


def table_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]], list[list[str]]]:
    """Header, our rows and the paper's rows, as strings (shared by terminal and Markdown)."""
    n = report.get("sample_size")
    header = ["dataset", "captions", "nouns", "nouns/cap", "DN", "VN", "VN/DN", f"VN/DN@{_num(n)}" if n else "VN/DN@n", "1x nouns", "words/cap"]
    ours = []
    for d in report["datasets"]:
        ours.append([
            d["name"], _num(d["captions"]), _num(d["total_nouns"]), f"{d['nouns_per_caption']['mean']:.2f}",
            _num(d["distinct_nouns"]), _num(d["valid_nouns"]), f"{d['vn_dn']:.1%}", _matched(d),
            f"{d['singleton_share']:.0%}", f"{d['words_per_caption']['mean']:.1f}",
        ])
    paper = [
        [f"{p['name']} (paper)", "~11.2M", _num(p["total_nouns"]), f"{p['nouns_per_caption']:.1f}",
         _num(p["distinct_nouns"]), _num(p["valid_nouns"]), f"{p['vn_dn']:.1%}", "-", "-", "-"]
        for p in report["paper_table1"]
    ]
    return header, ours, paper


def dataset_notes(d: dict[str, Any], top: bool = True) -> str:
    """One line of detail per dataset: empties, distribution, images, top nouns."""
    npc = d["nouns_per_caption"]
    parts = [f"{d['null_captions']:,} null + {d['empty_captions']:,} empty of {d['rows']:,} rows",
             f"nouns/caption sd {npc['sd']:.1f}, median {npc['median']}, p10-p90 {npc['p10']}-{npc['p90']}"]
    parts.append(f"non-English {d['non_english_share']:.1%} ({d['non_english_captions']:,}"
                 + (f", {d['dropped_non_english']:,} left out by --lang en)" if d["dropped_non_english"] else ")"))
    if d["split_captions"]:
        parts.append(f"{d['split_captions']:,} captions over the tagger's piece size, tagged in pieces")
    if d["bad_lines"]:
        parts.append(f"{d['bad_lines']:,} malformed lines skipped")
    if "images" in d:
        parts.append(f"{d['images']:,} images, {d['nouns_per_image']:.2f} nouns per image")
    if top:
        parts.append("top: " + ", ".join(f"{w} {c:,}" for w, c in d["top_nouns"][:10]))
    return "; ".join(parts)


def _console():
    """A rich console on stdout: the terminal's, or 160 columns wide in a pipe (no squeezing)."""
    import sys

    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=160)


def print_table(report: dict[str, Any], console=None) -> None:
    """The side-by-side table, with the paper's Table 1 as dimmed reference rows."""
    from rich.table import Table

    console = console or _console()
    header, ours, paper = table_rows(report)
    table = Table(title="Caption informativeness (paper Table 1 terms)", caption=f"{report['definition']['noun']}; VN: count > {report['definition']['valid_min']}; 1x: share of DN seen once. {PAPER_NOTE}")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right", no_wrap=i > 0)
    for row in ours:
        table.add_row(*row)
    table.add_section()
    for row in paper:
        table.add_row(*row, style="dim")
    console.print(table)
    for d in report["datasets"]:
        console.print(f"[bold]{d['name']}[/]: {dataset_notes(d)}", highlight=False)


def table_text(report: dict[str, Any]) -> str:
    """print_table's output as text: styled for a terminal, 160 columns wide in a pipe."""
    console = _console()
    with console.capture() as captured:
        print_table(report, console)
    return captured.get().rstrip("\n")


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2)


def to_markdown(report: dict[str, Any], plots: list[str] = ()) -> str:
    header, ours, paper = table_rows(report)
    lines = ["# Caption statistics", "", f"Noun: {report['definition']['noun']}. VN: {report['definition']['valid_noun']}.",
             f"Per-caption figures: {report['definition']['per_caption']}.", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in ours + paper]
    lines += ["", f"_{PAPER_NOTE}._", ""]
    if report.get("sample_size"):
        lines += [f"VN/DN @ {report['sample_size']:,}: mean ± sd over random subsamples of that many captions (fixed seed), "
                  "so datasets of different sizes compare fairly.", ""]
    for d in report["datasets"]:
        lines += [f"## {d['name']}", "", f"Files: {len(d['files'])}, column `{d['column']}`.", "", dataset_notes(d, top=False) + ".", ""]
        lines += ["Top nouns: " + ", ".join(f"{w} ({c:,})" for w, c in d["top_nouns"]), ""]
    for p in plots:
        lines += [f"![{Path(p).stem}]({Path(p).name})", ""]
    return "\n".join(lines)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_outputs(report: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """report.md, report.json and the PNG plots in `out_dir`; report.json is written last."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(report, out)
    _atomic_write(out / "report.md", to_markdown(report, [str(p) for p in plots]))
    _atomic_write(out / "report.json", to_json(report))
    return [*plots, out / "report.md", out / "report.json"]


def write_plots(report: dict[str, Any], out: Path) -> list[Path]:
    """Rank-frequency (log-log), nouns-per-caption histogram, vocabulary growth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []

    def save(fig, name: str) -> None:
        path = out / name
        tmp = out / f".{name}.{uuid.uuid4().hex[:8]}.tmp.png"
        fig.tight_layout()
        fig.savefig(tmp, dpi=120)
        plt.close(fig)
        os.replace(tmp, path)
        paths.append(path)

    valid_min = report["definition"]["valid_min"]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for d in report["datasets"]:
        if d["rank_frequency"]:
            r, c = zip(*d["rank_frequency"])
            ax.loglog(r, c, label=d["name"])
    ax.axhline(valid_min + 0.5, color="grey", ls="--", lw=0.8, label=f"VN threshold (> {valid_min})")
    ax.set(xlabel="noun rank", ylabel="occurrences", title="Rank-frequency of nouns (long tail)")
    ax.legend()
    save(fig, "rank_frequency.png")

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for d in report["datasets"]:
        hist = d["nouns_per_caption"]["histogram"]
        total = sum(hist) or 1
        ax.step(range(len(hist)), [h / total for h in hist], where="mid", label=f"{d['name']} (mean {d['nouns_per_caption']['mean']:.1f})")
    ax.set(xlabel="nouns per caption", ylabel="share of captions", title="Nouns per caption")
    ax.legend()
    save(fig, "nouns_per_caption.png")

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for d in report["datasets"]:
        if d["growth"]:
            x, y = zip(*d["growth"])
            ax.loglog(x, y, marker=".", label=d["name"])
    ax.set(xlabel="captions seen", ylabel="distinct nouns", title="Vocabulary growth")
    ax.legend()
    save(fig, "vocabulary_growth.png")
    return paths
