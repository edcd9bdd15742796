"""Readers for what idlebuf writes for people: the HTML report and the Perfetto timeline.

They read the files the way their consumers do - the HTML with a real HTML parser, the
timeline with Perfetto's own protobuf schema - and return plain data a test can compare.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from html import unescape
from html.parser import HTMLParser
from pathlib import Path

from perfetto.protos.perfetto.trace.perfetto_trace_pb2 import Trace, TrackEvent


@dataclass
class Report:
    table: list[list[str]] = field(default_factory=list)  # header row first; no details rows
    details: dict[str, dict[str, str]] = field(default_factory=dict)  # model -> key -> figure
    # title -> series -> its polylines' points, one per run of measured samples
    charts: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    bars: dict[str, dict[str, float]] = field(default_factory=dict)  # title -> label -> value
    # stacked bars: title -> label -> part -> bytes (None: drawn as unknown)
    stacks: dict[str, dict[str, dict[str, float | None]]] = field(default_factory=dict)
    headline: str = ""
    sizes: dict[str, tuple[float, float]] = field(default_factory=dict)  # title -> svg size
    models: list[str] = field(default_factory=list)  # explained models


class _Parser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.report = Report()
        self.stack: list[str] = []
        self.chart = ""
        self.cell: list[str] | None = None
        self.details: dict[str, str] | None = None  # the details row being read
        self.detail: str | None = None  # the key of the detail being read
        self.headline = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.stack.append(tag)
        if tag == "svg":
            self.chart = a.get("aria-label") or ""
            self.report.sizes[self.chart] = (float(a["width"] or 0), float(a["height"] or 0))
        elif tag == "section" and a.get("id") == "headline":
            self.headline = True
        elif tag == "tr" and a.get("class") == "details":
            self.details = self.report.details.setdefault(self.report.table[-1][0], {})
        elif tag == "tr":
            self.details = None
            self.report.table.append([])
        elif tag in ("td", "th") and self.details is None:
            self.cell = []
        elif tag == "span" and self.details is not None and "data-key" in a:
            self.detail = a["data-key"]
        elif tag == "polyline":
            series = self.report.charts.setdefault(self.chart, {})
            series.setdefault(a["data-series"] or "", []).append(a["points"] or "")
        elif tag == "rect" and "data-part" in a:
            parts = self.report.stacks.setdefault(self.chart, {}).setdefault(
                a["data-series"] or "", {}
            )
            for part in (a.get("data-parts") or a["data-part"] or "").split(", "):
                value = a["data-value"]
                parts[part] = None if value == "unknown" else float(value or 0)
        elif tag == "rect" and "data-value" in a:
            self.report.bars.setdefault(self.chart, {})[a["data-series"] or ""] = float(
                a["data-value"] or 0
            )

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self.cell is not None:
            self.report.table[-1].append("".join(self.cell).strip())
            self.cell = None
        elif tag == "section":
            self.headline = False
        elif tag == "span":
            self.detail = None
        while self.stack and self.stack.pop() != tag:
            pass

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        self.handle_endtag(tag)

    def handle_data(self, data: str) -> None:
        if self.headline:
            self.report.headline += data
        if self.cell is not None:
            self.cell.append(data)
        elif self.details is not None and self.detail and self.stack[-1] == "b":
            self.details[self.detail] = data.strip()
        elif self.stack and self.stack[-1] == "dt" and data.strip():
            self.report.models.append(data.strip())


def read_report(path: Path) -> Report:
    parser = _Parser()
    parser.feed(path.read_text())
    parser.close()
    return parser.report


@dataclass
class Process:
    pid: int
    counters: dict[str, list[tuple[int, int]]]  # track name -> [(ns, value)]


def read_timeline(path: Path) -> dict[str, Process]:
    """Process tracks by name, with their counter tracks' samples."""
    trace = Trace.FromString(path.read_bytes())
    processes: dict[int, tuple[str, Process]] = {}
    counters: dict[int, list[tuple[int, int]]] = {}
    for packet in trace.packet:
        if packet.HasField("track_descriptor"):
            d = packet.track_descriptor
            if d.HasField("process"):
                processes[d.uuid] = (d.process.process_name, Process(d.process.pid, {}))
            elif d.HasField("counter"):
                samples: list[tuple[int, int]] = []
                counters[d.uuid] = samples
                processes[d.parent_uuid][1].counters[d.name] = samples
        elif packet.HasField("track_event"):
            e = packet.track_event
            assert e.type == TrackEvent.TYPE_COUNTER
            counters[e.track_uuid].append((packet.timestamp, e.counter_value))
    return {name: proc for name, proc in processes.values()}


# Measures the page once it is laid out, and writes what it saw into <pre id="measured">:
# the viewport, what sticks out of its box or of the window (sideways), SVG text cut off by
# its chart's edge, the headline, the table's cells, and every chart's marks with their
# boxes (CSS pixels) and the x axis' ticks.
_MEASURE = """
<script>
(() => {
  const de = document.documentElement, vw = de.clientWidth;
  const box = (el) => { const r = el.getBoundingClientRect();
                        return [r.left, r.top, r.right, r.bottom]; };
  const name = (el) => el.tagName.toLowerCase() + (el.id ? "#" + el.id : "")
    + [...el.classList].map((c) => "." + c).join("");
  const lines = (el) => { const r = document.createRange(); r.selectNodeContents(el);
                          return new Set([...r.getClientRects()].map((q) => q.top)).size; };
  const overflowing = [];
  for (const el of document.body.querySelectorAll("*")) {
    if (el.closest("svg") && el.tagName.toLowerCase() !== "svg") continue;
    const r = el.getBoundingClientRect();
    if (r.width === 0 && r.height === 0) continue;
    if (el.clientWidth > 0 && el.scrollWidth > el.clientWidth + 1)
      overflowing.push([name(el), "scrolls", el.scrollWidth, el.clientWidth]);
    if (r.right > vw + 0.5 || r.left < -0.5)
      overflowing.push([name(el), "outside the window", r.left, r.right]);
  }
  const clipped = [];
  for (const svg of document.querySelectorAll("svg")) {
    const s = svg.getBoundingClientRect();
    for (const t of svg.querySelectorAll("text")) {
      const r = t.getBoundingClientRect();
      if (r.left < s.left - 1 || r.right > s.right + 1
          || r.top < s.top - 1 || r.bottom > s.bottom + 1)
        clipped.push([svg.getAttribute("aria-label"), t.textContent]);
    }
  }
  const headline = document.getElementById("headline");
  const mark = (m) => ({
    tag: m.tagName.toLowerCase(), series: m.getAttribute("data-series"),
    part: m.getAttribute("data-part"), parts: m.getAttribute("data-parts"),
    value: m.getAttribute("data-value"), fill: m.getAttribute("fill"), box: box(m),
    pattern: (m.getAttribute("fill") || "").startsWith("url(#")
      ? (document.getElementById(m.getAttribute("fill").slice(5, -1)) || {}).tagName || null
      : null,
  });
  const out = {
    viewport: [window.innerWidth, vw, de.scrollWidth],
    overflowing, clipped,
    headline: headline ? {text: headline.textContent, box: box(headline)} : null,
    cells: [...document.querySelectorAll("tr:not(.details) > td, tr:not(.details) > th")]
      .map((c) => [c.textContent, lines(c), c.tagName.toLowerCase()]),
    charts: [...document.querySelectorAll("figure.chart svg")].map((svg) => ({
      title: svg.getAttribute("aria-label"), box: box(svg),
      marks: [...svg.querySelectorAll("[data-series]")].map(mark),
      ticks: [...svg.querySelectorAll("text.xtick")].map((t) => {
        const [l, , r] = box(t); return [t.textContent, (l + r) / 2]; }),
      texts: [...svg.querySelectorAll("text")].map((t) => [t.textContent, box(t)]),
    })),
  };
  const pre = document.createElement("pre");
  pre.id = "measured";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
})();
</script>
"""
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]

Box = tuple[float, float, float, float]  # left, top, right, bottom


@dataclass
class Rendered:
    """What a real browser laid out: sizes in CSS pixels."""

    viewport: tuple[int, int, int]  # window.innerWidth, the page's clientWidth, scrollWidth
    overflowing: list[list]  # elements wider than their box, or out of the window sideways
    clipped: list[list]  # [chart, text] of SVG text cut off by its chart's edge
    headline: dict | None  # text, box
    cells: list[tuple[str, int, str]]  # text, lines it takes, td or th (no details rows)
    charts: list[dict]  # title, box, marks (tag, series, part, parts, value, fill, pattern,
    # box), ticks (x axis: label, centre), texts (text, box)

    def chart(self, prefix: str) -> dict:
        (found,) = [c for c in self.charts if c["title"].startswith(prefix)]
        return found


def render_in_chromium(
    page: Path, workdir: Path, width: int = 1280, height: int = 2400
) -> Rendered:
    """Lay `page` out in headless Chromium (Debian's, installed by scripts/bootstrap) in a
    window of `width` x `height`, keep a screenshot beside it (page-WIDTH.png) for a person
    to look at, and measure it."""
    import json
    import shutil
    import subprocess

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is not installed: run scripts/bootstrap"
    measured = workdir / f"measured-{width}.html"
    measured.write_text(page.read_text().replace("</body>", _MEASURE + "</body>"))
    profile = workdir / f"profile-{width}"

    def run(*args: str) -> str:
        done = subprocess.run(
            [
                chromium,
                *CHROMIUM_FLAGS,
                f"--window-size={width},{height}",
                f"--user-data-dir={profile}",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    run(f"--screenshot={workdir / f'page-{width}.png'}", page.as_uri())
    dom = run("--dump-dom", measured.as_uri())
    start = dom.index('<pre id="measured">') + len('<pre id="measured">')
    data = json.loads(unescape(dom[start : dom.index("</pre>", start)]))
    return Rendered(
        tuple(data["viewport"]),
        data["overflowing"],
        data["clipped"],
        data["headline"],
        [(text, n, tag) for text, n, tag in data["cells"]],
        data["charts"],
    )
