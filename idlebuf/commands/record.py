"""`idlebuf record`: attach the probes to processes or a command, write a trace directory."""

from __future__ import annotations

import argparse
import mmap
import sys
from dataclasses import replace
from pathlib import Path

from idlebuf.commands.options import number
from probes.format.errors import UsageError
from probes.loader import ProbeOptions
from probes.recorder import RecordConfig, Recorder


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "record",
        help="record posted reads of processes into a trace directory (root)",
        description="Record every socket read the kernel holds pending for the targets, with "
        "its buffer, into a trace directory. Stops on --duration, Ctrl-C, SIGTERM, or when "
        "the targets exit; the trace is finalized in every case.",
        epilog="examples:\n  idlebuf record -o trace -p 1234 --duration 10\n"
        "  idlebuf record -o trace -p 1234 --tree --memory --duration 10\n"
        "  idlebuf record -o trace -- python3 -m workloads.threaded_server",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-o", "--output", required=True, type=Path, help="trace directory to create")
    p.add_argument(
        "-p",
        "--pid",
        dest="pids",
        type=number(int, 1),
        action="append",
        default=[],
        help="trace this process, all its threads (repeatable)",
    )
    p.add_argument(
        "--tree",
        action="store_true",
        help="with -p: trace every descendant of each process too - those running at attach "
        "and those forked while recording (a server with a process per connection: "
        "PostgreSQL's postmaster and its backends). A process reached twice is traced once",
    )
    p.add_argument(
        "--duration",
        type=number(float, 0, above=True),
        help="stop after this many seconds, counted once the targets are attached (what was "
        "already waiting is found first)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing trace directory")
    p.add_argument(
        "--memory",
        action="store_true",
        help="the memory side: resident memory, kernel socket memory, and the allocation "
        "behind each buffer, found by reading the allocator's own structures (glibc, Go) "
        "when it is needed - no probe on malloc; and memory points (sockets held, heap in "
        "use, RSS) as connections come and go, with the kernel's slab caches, for the whole "
        "cost of an idle connection",
    )
    p.add_argument(
        "--alloc-probes",
        action="store_true",
        help="with --memory: trace every allocation with uprobes on the allocator (and mmap, "
        "brk) instead: allocation stacks, the live heap over time and allocation rates, at "
        "~1 us per allocator call. Allocators with no walker (jemalloc, tcmalloc, mimalloc) "
        "are probed anyway",
    )
    p.add_argument(
        "--min-alloc",
        type=number(int, 0),
        default=1024,
        metavar="BYTES",
        help="with --alloc-probes: ignore allocations smaller than this (default 1024; 0 "
        "tracks every allocation, so that small per-connection structs are fitted too)",
    )
    p.add_argument(
        "--sample",
        type=number(int, 1),
        default=1,
        metavar="N",
        help="with --alloc-probes: track one allocation address in N (default 1: all); "
        "allocator probes cost ~1 us per call",
    )
    p.add_argument(
        "--owned-budget",
        type=number(float, 0, above=True),
        default=10.0,
        metavar="SECONDS",
        help="with --memory: how long the walk of a process's heap for the state each "
        "connection keeps alive may take, at attach and at the end (default 10); what it "
        "did not reach by then is unknown, and said",
    )
    p.add_argument(
        "--min-wait",
        type=number(float, 0),
        default=0.0,
        metavar="MS",
        help="record only reads and writes that wait at least MS milliseconds (and so hold "
        "their buffers); quicker ones are only counted, in the kernel, and readiness waits are "
        "not traced. The cheapest mode for busy servers; parked reads, retained buffers and "
        "per-connection activity need every read and are not available with it",
    )
    p.add_argument(
        "--wait-hooks",
        choices=("auto", "scheduler", "syscalls"),
        default="auto",
        help="with --min-wait, how calls are seen waiting: 'scheduler' (sched_switch and "
        "sock:sock_recv/send_length; a call that does not wait costs one lookup at its "
        "return; Linux 6.9+), "
        "'syscalls' (syscall tracepoints: every syscall of every process pays ~0.5 us), "
        "'auto' (default: scheduler where the kernel allows)",
    )
    p.add_argument(
        "--no-writes",
        action="store_true",
        help="do not trace writes to sockets (pending write bytes): halves the probes' cost "
        "on a server that writes as often as it reads",
    )
    p.add_argument(
        "--ring-buffer",
        type=number(int, 1, 1024),
        default=16,
        metavar="MIB",
        help="kernel ring buffer size, a power of two (default 16: ~190k events of slack; "
        "more absorbs longer bursts when the recorder is starved of CPU)",
    )
    p.add_argument(
        "--alternate",
        type=number(float, 0, above=True),
        metavar="SECONDS",
        help="switch tracing off and on every SECONDS, to measure what it costs the traced "
        "program: compare its throughput in the two halves (meta.json lists when each switch "
        "began and ended). Calls in flight across a switch are incomplete in the trace",
    )
    p.add_argument(
        "--print-bpf",
        action="store_true",
        help="print the BPF C program as it would be compiled here, and exit",
    )
    p.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        metavar="-- COMMAND ARGS",
        help="run COMMAND and trace it from its first instruction, children included",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if command and not command[0]:
        raise UsageError("the command to run is empty")
    if args.tree and not args.pids:
        raise UsageError("--tree applies to -p PID: give the process whose tree to trace")
    if args.alloc_probes and not args.memory:
        raise UsageError("--alloc-probes applies to --memory recordings only")
    if args.wait_hooks != "auto" and not args.min_wait:
        raise UsageError("--wait-hooks applies to --min-wait recordings only")
    mib = args.ring_buffer
    if mib < 1 or mib & (mib - 1) or mib > 1024:
        raise UsageError("--ring-buffer must be a power of two MiB, from 1 to 1024")
    options = ProbeOptions(
        memory=args.memory,
        alloc_probes=args.alloc_probes,
        min_alloc=args.min_alloc,
        sample_every=args.sample,
        owned_budget_s=args.owned_budget,
        ringbuf_pages=mib * (1 << 20) // mmap.PAGESIZE,
        min_wait_ns=round(args.min_wait * 1e6),
        wait_hooks=args.wait_hooks,
        writes=not args.no_writes,
    )
    if args.print_bpf:
        from probes.btf import BTF
        from probes.loader import Program

        options = replace(options, follow_children=bool(command) or args.tree)
        print(Program.for_options(options, BTF.load()).rendered())
        return 0
    config = RecordConfig(
        output=args.output,
        pids=args.pids,
        tree=args.tree,
        command=command,
        duration=args.duration,
        force=args.force,
        probe_options=options,
        alternate=args.alternate,
    )
    interactive = sys.stderr.isatty()

    def progress(line: str) -> None:
        if interactive:
            sys.stderr.write("\r\033[K" + line)
            sys.stderr.flush()

    summary = Recorder(config, progress=progress).run()
    if interactive:
        sys.stderr.write("\n")
    drops = sum(summary.drops.values())
    print(
        f"idlebuf: recorded {summary.posts:,} posts and {summary.completions:,} completions "
        f"in {summary.elapsed:.1f}s ({summary.stop_reason}) to {summary.output}"
        + (f"; {drops:,} events DROPPED" if drops else ""),
        file=sys.stderr,
    )
    return 0
