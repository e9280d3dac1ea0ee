"""How ``graphopt optimize --sensitivity`` shows the quantizer's per-layer measurement: a text
table, a PNG bar chart (matplotlib, imported only when a plot is asked for) and, when no layer was
measured, the quantize pass's reasons."""

from __future__ import annotations

import collections
from typing import Any

from graphopt.errors import GraphoptError

__all__ = ["nothing_quantized", "plot_sensitivity", "pyplot", "sensitivity_table"]


def sensitivity_table(rows: list[dict[str, Any]]) -> str:
    """The per-layer sensitivity rows as an aligned text table (layer, op, min cosine, SQNR)."""
    out = [("layer", "op", "min cosine", "SQNR dB")]
    for r in rows:
        cos, sq = r.get("min_cosine"), r.get("sqnr_db")
        out.append(
            (
                str(r.get("node")),
                str(r.get("op_type")),
                f"{cos:.6f}" if isinstance(cos, float) else str(cos),
                f"{sq:.1f}" if isinstance(sq, float) else str(sq),
            )
        )
    widths = [max(len(row[i]) for row in out) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in out)


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or a one-line error naming the package to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise GraphoptError("--sensitivity-plot needs matplotlib: pip install matplotlib") from None
    return plt


def nothing_quantized(report: Any) -> str:
    """Why no layer was measured: the quantize pass's reasons for keeping layers in float."""
    reasons: collections.Counter[str] = collections.Counter()
    for p in report.passes:
        for key, n in p.stats.items():
            if key.startswith("float:"):
                reasons[key[len("float:") :]] += n
    if not reasons:
        return "no layer was quantized"
    listed = "; ".join(f"{why} ({n} layer{'s' if n > 1 else ''})" for why, n in reasons.most_common(3))
    return f"no layer was quantized: {listed}"


def plot_sensitivity(rows: list[dict[str, Any]], none_measured: str | None = None) -> bytes:
    """PNG bar chart of 1 - cosine per layer (log scale), worst first; with no rows, a figure
    that says why there is nothing to show."""
    import io

    plt = pyplot()
    if not rows:
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.axis("off")
        ax.text(
            0.5,
            0.5,
            "per-layer quantization sensitivity:\n" + (none_measured or "no layer was quantized"),
            ha="center",
            va="center",
            wrap=True,
            fontsize=9,
        )
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120)
        plt.close(fig)
        return buf.getvalue()
    names = [str(r["node"]) for r in rows]
    loss = [
        max(1.0 - float(r["min_cosine"]), 1e-9) if isinstance(r["min_cosine"], float) else 1.0 for r in rows
    ]
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(rows)), 4))
    ax.bar(range(len(rows)), loss, color="tab:red")
    ax.set_yscale("log")
    ax.set_ylabel("1 - min cosine (layer quantized alone)")
    ax.set_xticks(range(len(rows)), names, rotation=90, fontsize=6)
    ax.set_title("per-layer quantization sensitivity")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()
