"""Small self-contained SVG charts for the HTML reports (no plotting library, no scripts).

Every chart is a <figure> holding an <svg>; each series is a <polyline> (or a bar <rect>) with
a data-series attribute naming it, so a reader - or a test - can find what was drawn.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from html import escape

PALETTE = ["#1b9e77", "#7570b3", "#d95f02", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666"]
# equal series overlap exactly (three queued models hold the same buffers): dashes keep each seen
DASHES = ["", "7 3", "2 3", "9 3 2 3", "4 4", "1 5", "12 4", "3 2 1 2"]
WIDTH, HEIGHT = 640, 300
LEFT, RIGHT, TOP, BOTTOM = 78, 170, 30, 42

Series = tuple[str, Sequence[float], Sequence[float]]  # (label, xs, ys)


def nice_ticks(top: float, count: int = 4, binary: bool = False) -> list[float]:
    """Round tick values from 0 to at least `top` (round in KiB/MiB/GiB when `binary`)."""
    if top <= 0:
        return [0.0, 1.0]
    unit = 1024 ** max(0, math.floor(math.log(top, 1024))) if binary else 1
    raw = top / unit / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw) * unit
    return [i * step for i in range(math.ceil(top / step) + 1)]


def _frame(title: str, body: list[str], caption: str = "") -> str:
    cap = f"<figcaption>{escape(caption)}</figcaption>" if caption else ""
    return (
        f'<figure class="chart"><svg xmlns="http://www.w3.org/2000/svg" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img" '
        f'aria-label="{escape(title)}"><title>{escape(title)}</title>'
        f'<text x="{LEFT}" y="18" class="title">{escape(title)}</text>'
        + "".join(body)
        + f"</svg>{cap}</figure>"
    )


def line_chart(
    title: str,
    series: Sequence[Series],
    y_format: Callable[[float], str],
    x_label: str,
    x_format: Callable[[float], str] = lambda x: f"{x:g}",
    markers: bool = False,
    caption: str = "",
    binary: bool = False,
) -> str:
    """One line per series, sharing axes that start at zero; a legend on the right.
    `binary`: the values are bytes, ticked at round KiB/MiB/GiB."""
    xs = [x for _, sx, _ in series for x in sx]
    ys = [y for _, _, sy in series for y in sy]
    x_ticks = nice_ticks(max(xs, default=1))
    y_ticks = nice_ticks(max(ys, default=1), binary=binary)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + plot_w * x / x_ticks[-1]

    def py(y: float) -> float:
        return TOP + plot_h * (1 - y / y_ticks[-1])

    body = []
    for t in y_ticks:
        body.append(
            f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{py(t):.1f}" y2="{py(t):.1f}" '
            f'class="grid"/><text x="{LEFT - 6}" y="{py(t) + 4:.1f}" class="ytick">'
            f"{escape(y_format(t))}</text>"
        )
    for t in x_ticks:
        body.append(
            f'<text x="{px(t):.1f}" y="{TOP + plot_h + 16}" class="xtick">'
            f"{escape(x_format(t))}</text>"
        )
    body.append(
        f'<text x="{LEFT + plot_w / 2}" y="{HEIGHT - 6}" class="xlabel">{escape(x_label)}</text>'
    )
    for i, (label, sx, sy) in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(sx, sy))
        body.append(
            f'<polyline data-series="{escape(label)}" points="{points}" fill="none" '
            f'stroke="{color}" stroke-width="2" stroke-dasharray="{DASHES[i % len(DASHES)]}"/>'
        )
        if markers:
            body += [
                f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}"/>'
                for x, y in zip(sx, sy)
            ]
        ly = TOP + 14 * i + 8
        body.append(
            f'<line x1="{WIDTH - RIGHT + 8}" x2="{WIDTH - RIGHT + 30}" y1="{ly - 3}" '
            f'y2="{ly - 3}" stroke="{color}" stroke-width="2" '
            f'stroke-dasharray="{DASHES[i % len(DASHES)]}"/>'
            f'<text x="{WIDTH - RIGHT + 34}" y="{ly + 1}" class="legend">{escape(label)}</text>'
        )
    return _frame(title, body, caption)


def bar_chart(
    title: str, items: Sequence[tuple[str, float]], fmt: Callable[[float], str], caption: str = ""
) -> str:
    """Horizontal bars, one per item, each labelled with its value."""
    top = max((v for _, v in items), default=0) or 1
    row_h = (HEIGHT - TOP - 10) / max(len(items), 1)
    left, plot_w = 150, WIDTH - 150 - 110
    body = []
    for i, (label, value) in enumerate(items):
        y = TOP + i * row_h
        w = plot_w * value / top
        body.append(
            f'<text x="{left - 6}" y="{y + row_h / 2 + 4:.1f}" class="ytick">{escape(label)}</text>'
            f'<rect data-series="{escape(label)}" data-value="{value:g}" x="{left}" '
            f'y="{y + 3:.1f}" width="{w:.1f}" height="{row_h - 6:.1f}" '
            f'fill="{PALETTE[i % len(PALETTE)]}"/>'
            f'<text x="{left + w + 6:.1f}" y="{y + row_h / 2 + 4:.1f}" class="value">'
            f"{escape(fmt(value))}</text>"
        )
    return _frame(title, body, caption)


STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222;
  padding: 0 1em; }
#rows, #fits { display: block; overflow-x: auto; max-width: 100%; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; }
table { border-collapse: collapse; }
td, th { padding: 3px 9px; border-bottom: 1px solid #ddd; white-space: nowrap; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.charts { display: flex; flex-wrap: wrap; gap: 8px; } figure.chart { margin: 0; }
svg text { font: 11px system-ui, sans-serif; fill: #333; } svg .title { font-weight: 600; }
svg .grid { stroke: #e4e4e4; } svg .ytick { text-anchor: end; } svg .xtick { text-anchor: middle; }
svg .xlabel { text-anchor: middle; } figcaption { font-size: 12px; color: #555; max-width: 640px; }
dt { font-weight: 600; margin-top: .6em; } .note { color: #555; }
"""
