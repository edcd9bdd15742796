"""Small self-contained SVG charts for the HTML reports (no plotting library, no scripts).

Every chart is a <figure> holding an <svg> whose viewBox is as tall as its content (a bar per
row, a legend line per series); the page scales it to its column. Each series is drawn as
<polyline>s - one per run of measured points, so that a figure not measured at an instant is
a gap, never a 0 - or as bar <rect>s, with data-series (and data-part, data-value) attributes
naming what was drawn, so a reader - or a test - can find it.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

PALETTE = ["#1b9e77", "#7570b3", "#d95f02", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666"]
# equal series overlap exactly (three queued models hold the same buffers): dashes keep each seen
DASHES = ["", "7 3", "2 3", "9 3 2 3", "4 4", "1 5", "12 4", "3 2 1 2"]
# the parts of a stacked bar, in stacking order (the IO buffer first: what this tool is about)
IO_BUFFER_COLOR = "#d95f02"
PART_COLORS = [IO_BUFFER_COLOR, "#7570b3", "#1b9e77", "#e7298a", "#66a61e", "#a6761d"]
WIDTH, HEIGHT = 640, 300
LEFT, RIGHT, TOP, BOTTOM = 78, 170, 30, 42
LEGEND_LINE = 14
BAR_ROW, BAR_LEFT, BAR_RIGHT = 24, 150, 130  # a bar chart's row height and margins
UNKNOWN_STUB = 56  # the width of an unknown part whose size is not known at all

Series = tuple[str, Sequence[float], Sequence[float | None]]  # (label, xs, ys); None: a gap


@dataclass(frozen=True)
class Stack:
    """One stacked bar: its parts in order (None: unknown) and their total (None: unknown,
    the known parts being a lower bound); `why` says why a part is unknown."""

    label: str
    parts: Sequence[tuple[str, float | None]]
    total: float | None
    why: str = ""


def nice_ticks(top: float, count: int = 4, binary: bool = False) -> list[float]:
    """Round tick values from 0 to at least `top` (round in KiB/MiB/GiB when `binary`): about
    `count` intervals, of the round step that overshoots `top` least (0-5 for 5 s, not 0-6)."""
    if top <= 0:
        return [0.0, 1.0]
    unit = 1024 ** max(0, math.floor(math.log(top, 1024))) if binary else 1
    magnitude = 10 ** math.floor(math.log10(top / unit / count))
    steps = [m * magnitude * unit for m in (1, 2, 2.5, 5, 10, 20)]
    fitting = [s for s in steps if count - 1 <= math.ceil(top / s) <= count + 2]
    step = min(fitting or steps[-1:], key=lambda s: (math.ceil(top / s) * s - top, -s))
    return [i * step for i in range(math.ceil(top / step) + 1)]


def runs(xs: Sequence[float], ys: Sequence[float | None]) -> list[list[tuple[float, float]]]:
    """The measured points of a series, split where a figure is missing."""
    out: list[list[tuple[float, float]]] = []
    current: list[tuple[float, float]] = []
    for x, y in zip(xs, ys):
        if y is None:
            if current:
                out.append(current)
            current = []
        else:
            current.append((x, y))
    if current:
        out.append(current)
    return out


def _frame(title: str, body: list[str], height: float, caption: str = "", defs: str = "") -> str:
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    height = math.ceil(height)
    return (
        f'<figure class="chart"><svg xmlns="http://www.w3.org/2000/svg" '
        f'viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" height="{height}" role="img" '
        f'aria-label="{escape(title)}"><title>{escape(title)}</title>{defs}'
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
    """One line per series, sharing axes that start at zero; a legend on the right. A point
    whose y is None was not measured: the line stops there and resumes at the next measured
    point (a point alone is drawn as a dot). `binary`: the values are bytes, ticked at round
    KiB/MiB/GiB."""
    xs = [x for _, sx, _ in series for x in sx]
    ys = [y for _, _, sy in series for y in sy if y is not None]
    x_ticks = nice_ticks(max(xs, default=1))
    y_ticks = nice_ticks(max(ys, default=1), binary=binary)
    height = max(HEIGHT, TOP + LEGEND_LINE * len(series) + BOTTOM)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, height - TOP - BOTTOM

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
        f'<text x="{LEFT + plot_w / 2}" y="{height - 6}" class="xlabel">{escape(x_label)}</text>'
    )
    for i, (label, sx, sy) in enumerate(series):
        color, dash = PALETTE[i % len(PALETTE)], DASHES[i % len(DASHES)]
        name = escape(label)
        for run in runs(sx, sy):
            points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in run)
            body.append(
                f'<polyline data-series="{name}" points="{points}" fill="none" '
                f'stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/>'
            )
            if markers or len(run) == 1:  # a point between two gaps: a dot, or nothing shows
                body += [
                    f'<circle data-series="{name}" cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" '
                    f'fill="{color}"/>'
                    for x, y in run
                ]
        ly = TOP + LEGEND_LINE * i + 8
        body.append(
            f'<line x1="{WIDTH - RIGHT + 8}" x2="{WIDTH - RIGHT + 30}" y1="{ly - 3}" '
            f'y2="{ly - 3}" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/>'
            f'<text x="{WIDTH - RIGHT + 34}" y="{ly + 1}" class="legend">{name}</text>'
        )
    return _frame(title, body, height, escape(caption))


def bar_chart(
    title: str,
    items: Sequence[tuple[str, float]],
    fmt: Callable[[float], str],
    caption: str = "",
    color: str | None = None,
) -> str:
    """Horizontal bars, one per item, each labelled with its value; as tall as its bars.
    `color`: every bar's (what they measure), else one per item from the palette."""
    top = max((v for _, v in items), default=0) or 1
    plot_w = WIDTH - BAR_LEFT - BAR_RIGHT
    body = []
    for i, (label, value) in enumerate(items):
        y = TOP + i * BAR_ROW
        w = plot_w * value / top
        body.append(
            f'<text x="{BAR_LEFT - 6}" y="{y + BAR_ROW / 2 + 4:.1f}" class="ytick">'
            f"{escape(label)}</text>"
            f'<rect data-series="{escape(label)}" data-value="{value:g}" x="{BAR_LEFT}" '
            f'y="{y + 3:.1f}" width="{w:.1f}" height="{BAR_ROW - 6}" '
            f'fill="{color or PALETTE[i % len(PALETTE)]}"/>'
            f'<text x="{BAR_LEFT + w + 6:.1f}" y="{y + BAR_ROW / 2 + 4:.1f}" class="value">'
            f"{escape(fmt(value))}</text>"
        )
    return _frame(title, body, TOP + len(items) * BAR_ROW + 8, escape(caption))


def stacked_bar_chart(
    title: str, stacks: Sequence[Stack], fmt: Callable[[float], str], caption: str = ""
) -> str:
    """Horizontal bars of parts, one bar per stack, a legend of the parts above them. An
    unknown part is drawn hatched and labelled "unknown", never as 0: as wide as the total
    leaves for it where the total is known, else as a stub after the known parts, whose sum
    is then labelled as a lower bound. `caption` is HTML (the reasons, already escaped)."""
    names = list(dict.fromkeys(name for s in stacks for name, _ in s.parts))
    colors = {name: PART_COLORS[i % len(PART_COLORS)] for i, name in enumerate(names)}
    hatch = f"hatch-{zlib.crc32(title.encode()):08x}"  # one per chart: ids are page-wide
    defs = (
        f'<defs><pattern id="{hatch}" width="6" height="6" patternUnits="userSpaceOnUse" '
        f'patternTransform="rotate(45)"><rect width="6" height="6" fill="#f4f4f4"/>'
        f'<line x1="0" y1="0" x2="0" y2="6" stroke="#999" stroke-width="2"/></pattern></defs>'
    )
    body = []
    x = float(BAR_LEFT)
    for name, fill in [*colors.items(), ("unknown", f"url(#{hatch})")]:
        body.append(
            f'<rect x="{x:.1f}" y="{TOP - 6}" width="10" height="10" fill="{fill}" '
            f'stroke="#999" stroke-width="0.5"/>'
            f'<text x="{x + 14:.1f}" y="{TOP + 3}" class="legend">{escape(name)}</text>'
        )
        x += 14 + 6.5 * len(name) + 14
    known = [sum(v for _, v in s.parts if v is not None) for s in stacks]
    top = max([*(s.total or 0 for s in stacks), *known], default=0) or 1
    # room for the stub and its "≥ ... + unknown" where a total is unknown
    plot_w = (
        WIDTH - BAR_LEFT - BAR_RIGHT - (UNKNOWN_STUB + 30) * any(s.total is None for s in stacks)
    )
    first = TOP + 14
    for i, stack in enumerate(stacks):
        y = first + i * BAR_ROW
        mid = y + BAR_ROW / 2 + 4
        label = escape(stack.label)
        body.append(f'<text x="{BAR_LEFT - 6}" y="{mid:.1f}" class="ytick">{label}</text>')
        x = float(BAR_LEFT)
        for name, value in stack.parts:
            if value is None:
                continue
            w = plot_w * value / top
            body.append(
                f'<rect data-series="{label}" data-part="{escape(name)}" data-value="{value:g}" '
                f'x="{x:.1f}" y="{y + 3:.1f}" width="{w:.1f}" height="{BAR_ROW - 6}" '
                f'fill="{colors[name]}"><title>{label}: {escape(name)} {escape(fmt(value))}'
                "</title></rect>"
            )
            x += w
        unknown = [name for name, value in stack.parts if value is None]
        if unknown:
            w = UNKNOWN_STUB
            if stack.total is not None:  # what the total leaves for the unknown parts
                w = max(plot_w * (stack.total - known[i]) / top, 6)
            parts = escape(", ".join(unknown))
            why = f": {escape(stack.why)}" if stack.why else ""
            body.append(
                f'<rect class="unknown" data-series="{label}" data-part="unknown" '
                f'data-parts="{parts}" data-value="unknown" x="{x:.1f}" y="{y + 3:.1f}" '
                f'width="{w:.1f}" height="{BAR_ROW - 6}" fill="url(#{hatch})" stroke="#999" '
                f'stroke-width="0.5"><title>{label}: unknown {parts}{why}</title></rect>'
            )
            if w >= 44:
                body.append(
                    f'<text x="{x + w / 2:.1f}" y="{mid:.1f}" class="unknown">unknown</text>'
                )
            x += w
        total = (  # where the total is unknown, the known parts are a lower bound
            escape(fmt(stack.total))
            if stack.total is not None
            else f"≥ {escape(fmt(known[i]))} + unknown"
        )
        body.append(f'<text x="{x + 6:.1f}" y="{mid:.1f}" class="value">{total}</text>')
    return _frame(title, body, first + len(stacks) * BAR_ROW + 8, caption, defs)


STYLE = """
:root { --ink: #222; --muted: #5b5b5b; --rule: #dcdcdc; --key: #fff4e5; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, sans-serif; margin: 0; color: var(--ink);
  padding: 1.2em clamp(16px, 2.5vw, 40px) 3em; }
main { max-width: 2000px; margin: 0 auto; }
h1 { font-size: 1.5em; margin: 0 0 .2em; } h2 { font-size: 1.15em; margin: 1.8em 0 .5em; }
p { max-width: 75em; }
#headline { border-left: 4px solid #d95f02; background: #fbf7f2; padding: .7em 1em;
  margin: 1em 0 1.2em; font-size: 1.2em; line-height: 1.5; max-width: 60em; }
#headline p { margin: 0; }
table { border-collapse: collapse; }
#rows { width: 100%; max-width: 1500px; }
td, th { padding: 4px 9px; border-bottom: 1px solid var(--rule); }
th { font-weight: 600; vertical-align: bottom; text-align: left; }
td { white-space: nowrap; }
th.num { max-width: 9em; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.model { font-weight: 600; } th.model { white-space: nowrap; }
.key { background: var(--key); } td.key { font-weight: 600; }
tr.has-details td { border-bottom: none; }
tr.details td { padding-top: 0; font-size: 12px; color: var(--muted); white-space: normal; }
tr.details .figures { display: flex; flex-wrap: wrap; column-gap: 1.6em; }
tr.details .figure { white-space: nowrap; } tr.details b { font-weight: 500; color: var(--ink); }
.charts { display: grid; gap: 12px 20px;
  grid-template-columns: repeat(auto-fill, minmax(min(100%, 520px), 1fr)); }
figure.chart { margin: 0; min-width: 0; }
figure.chart svg { display: block; width: 100%; height: auto; }
svg text { font: 11px system-ui, sans-serif; fill: #333; } svg .title { font-weight: 600; }
svg .grid { stroke: #e4e4e4; } svg .ytick { text-anchor: end; } svg .xtick { text-anchor: middle; }
svg .xlabel { text-anchor: middle; } svg text.unknown { text-anchor: middle; font-weight: 600; }
figcaption { font-size: 12px; color: var(--muted); margin-top: 2px; }
.glossary { font-size: 13px; color: #333; max-width: 75em; }
dt { font-weight: 600; margin-top: .6em; } dd { max-width: 75em; } .note { color: var(--muted); }
"""
