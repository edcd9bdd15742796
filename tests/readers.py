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
    table: list[list[str]] = field(default_factory=list)  # header row first
    charts: dict[str, dict[str, str]] = field(default_factory=dict)  # title -> series -> points
    bars: dict[str, dict[str, float]] = field(default_factory=dict)  # title -> label -> value
    models: list[str] = field(default_factory=list)  # explained models


class _Parser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.report = Report()
        self.stack: list[str] = []
        self.chart = ""
        self.cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.stack.append(tag)
        if tag == "svg":
            self.chart = a.get("aria-label") or ""
        elif tag == "tr":
            self.report.table.append([])
        elif tag in ("td", "th"):
            self.cell = []
        elif tag == "polyline":
            self.report.charts.setdefault(self.chart, {})[a["data-series"] or ""] = (
                a["points"] or ""
            )
        elif tag == "rect" and "data-value" in a:
            self.report.bars.setdefault(self.chart, {})[a["data-series"] or ""] = float(
                a["data-value"] or 0
            )

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self.cell is not None:
            self.report.table[-1].append("".join(self.cell).strip())
            self.cell = None
        while self.stack and self.stack.pop() != tag:
            pass

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        self.handle_endtag(tag)

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)
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


# Measures the page once it is laid out, and writes what it saw into <pre id="measured">.
_MEASURE = """
<script>
(() => {
  const box = (el) => { const r = el.getBoundingClientRect(); return [r.width, r.height]; };
  const lines = (el) => { const r = document.createRange(); r.selectNodeContents(el);
                          return new Set([...r.getClientRects()].map((q) => q.top)).size; };
  const table = document.querySelector("table");
  const out = {
    table: table ? box(table) : null,
    cells: [...document.querySelectorAll("td, th")].map((c) => [c.textContent, lines(c)]),
    charts: [...document.querySelectorAll("figure.chart svg")].map((svg) => ({
      title: svg.getAttribute("aria-label"), box: box(svg),
      marks: [...svg.querySelectorAll("polyline, rect")].map((m) => box(m)),
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
    "--window-size=900,2400",  # narrower than the table: cells must still not wrap
]


@dataclass
class Rendered:
    """What a real browser laid out: sizes in CSS pixels."""

    table: tuple[float, float] | None
    cells: list[tuple[str, int]]  # text, lines it takes
    charts: list[dict]  # title, box, marks (each polyline's or bar's box)


def render_in_chromium(page: Path, workdir: Path) -> Rendered:
    """Lay `page` out in headless Chromium (Debian's, installed by scripts/bootstrap), keep a
    screenshot beside it (page.png) for a person to look at, and measure it."""
    import json
    import shutil
    import subprocess

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is not installed: run scripts/bootstrap"
    measured = workdir / "measured.html"
    measured.write_text(page.read_text().replace("</body>", _MEASURE + "</body>"))

    def run(*args: str) -> str:
        done = subprocess.run(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={workdir / 'profile'}", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    run(f"--screenshot={workdir / 'page.png'}", page.as_uri())
    dom = run("--dump-dom", measured.as_uri())
    start = dom.index('<pre id="measured">') + len('<pre id="measured">')
    data = json.loads(unescape(dom[start : dom.index("</pre>", start)]))
    return Rendered(
        tuple(data["table"]) if data["table"] else None,
        [(text, n) for text, n in data["cells"]],
        data["charts"],
    )
