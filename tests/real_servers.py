"""Real servers from Debian's packages (MariaDB, PostgreSQL, Redis) for the tests: each started
on loopback as its own user, with its own temporary data directory, on a free port, in a
memory cgroup of its own, and stopped at the end whatever happens; and clients that speak
each protocol over a plain socket (no client library: the connections are what is measured).

The cgroup (cgroup v1's memory controller, present on the reference machine) gives what the
kernel charged to the server alone - kernel stacks, page tables, slab objects, socket
buffers (memory.kmem.usage_in_bytes) - untouched by whatever else runs on the machine,
which /proc/meminfo and /proc/slabinfo are not. One object escapes it: an accepted TCP
socket is cloned from its listener in softirq context (sk_clone_lock), charged to no
cgroup; `kernel_truth` adds it at /proc/slabinfo's object size.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MEMCG = Path("/sys/fs/cgroup/memory")
PG_BIN = Path("/usr/lib/postgresql/15/bin")
IDLE_USER = "idle"  # the account the idle connections log in as (MariaDB, PostgreSQL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(ok: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not ok():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def status(pid: int, key: str) -> int:
    """A /proc/PID/status figure, in bytes (kB lines) or as is (counts)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(f"{key}:"):
                fields = line.split()
                return int(fields[1]) * (1024 if fields[-1] == "kB" else 1)
    raise KeyError(key)


def private_bytes(pid: int) -> int:
    """Private_Clean + Private_Dirty of /proc/PID/smaps_rollup."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return sum(
            int(line.split()[1]) * 1024
            for line in f
            if line.startswith(("Private_Clean:", "Private_Dirty:"))
        )


def slab_object_size(cache: str) -> int:
    """A slab cache's object size (/proc/slabinfo's objsize)."""
    with open("/proc/slabinfo") as f:
        for line in f:
            fields = line.split()
            if fields and fields[0] == cache:
                return int(fields[3])
    raise KeyError(cache)


# --- a memory cgroup per server ----------------------------------------------------------------
class MemoryGroup:
    """A cgroup v1 memory group: what the kernel charges its processes, apart from the rest
    of the machine. A server joins it before it execs (`enter_command`)."""

    def __init__(self, name: str) -> None:
        if not (MEMCG / "cgroup.procs").exists():
            raise AssertionError("cgroup v1's memory controller is not mounted at " + str(MEMCG))
        self.path = MEMCG / f"idlebuf-{name}-{os.getpid()}-{time.monotonic_ns()}"
        self.path.mkdir()

    def enter_command(self, command: list[str], log: Path | None = None) -> list[str]:
        """`command` run from a shell that first moves itself into the group (its pid is
        the command's: exec), its stderr to `log` if given."""
        errors = f" 2>>{log}" if log else ""
        script = f'echo $$ > {self.path}/cgroup.procs && exec "$@"{errors}'
        return ["sh", "-c", script, "sh", *command]

    def kernel(self) -> int:
        """Kernel memory charged to the group: stacks, page tables, slab objects, sockets."""
        return int((self.path / "memory.kmem.usage_in_bytes").read_text())

    def kernel_truth(self, before: int, connections: int) -> float:
        """The kernel's memory per connection since `before` (a kernel() reading): what the
        group was charged, plus each accepted socket's TCP object, which it is not."""
        return (self.kernel() - before) / connections + slab_object_size("TCP")

    def anon(self) -> int:
        """Its anonymous pages (memory.stat's rss)."""
        stat = dict(line.split() for line in (self.path / "memory.stat").read_text().splitlines())
        return int(stat["rss"])

    def user(self) -> int:
        """Its anonymous and file pages (memory.stat's rss + cache)."""
        stat = dict(line.split() for line in (self.path / "memory.stat").read_text().splitlines())
        return int(stat["rss"]) + int(stat["cache"])

    def remove(self) -> None:
        deadline = time.monotonic() + 10
        while True:
            try:
                self.path.rmdir()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)  # its last processes are still exiting


@dataclass
class Server:
    """A server started here: its process (or its launcher's), port and data directory."""

    proc: subprocess.Popen[bytes]
    port: int
    home: Path
    group: MemoryGroup
    socket_dir: Path

    @property
    def pid(self) -> int:
        return self.proc.pid


def own_directory(user: str, prefix: str) -> Path:
    """A temporary directory the server's user owns, under a path it can traverse (pytest's
    tmp_path is root's alone)."""
    home = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    home.chmod(0o755)
    account = pwd.getpwnam(user)
    os.chown(home, account.pw_uid, account.pw_gid)
    return home


def as_user(user: str, command: list[str]) -> list[str]:
    """`command` exec'ed as `user` (setpriv keeps the pid: nothing waits in between)."""
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--", *command]


@contextlib.contextmanager
def stopped_at_end(server: Server, sig: int = signal.SIGTERM) -> Iterator[Server]:
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            server.proc.send_signal(sig)
            try:
                server.proc.wait(60)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait()
        with contextlib.suppress(OSError):
            server.group.remove()
        shutil.rmtree(server.home, ignore_errors=True)


# --- MariaDB -------------------------------------------------------------------------------------
@contextlib.contextmanager
def mariadb(thread_handling: str, max_connections: int) -> Iterator[Server]:
    """mariadbd as `mysql`, on a free loopback port, `thread_handling` one-thread-per-
    connection or pool-of-threads, with an account `idle` (no password) for the clients."""
    assert shutil.which("mariadbd"), "mariadb-server is not installed (scripts/bootstrap)"
    home = own_directory("mysql", "idlebuf-mariadb-")
    data = home / "data"
    subprocess.run(
        ["mariadb-install-db", "--user=mysql", f"--datadir={data}", "--skip-test-db",
         "--auth-root-authentication-method=socket"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    port, group = free_port(), MemoryGroup("mariadb")
    command = [
        "mariadbd", "--no-defaults", "--user=mysql", f"--datadir={data}",
        f"--socket={home}/sock", f"--port={port}", "--bind-address=127.0.0.1",
        f"--pid-file={home}/pid", f"--log-error={home}/error.log", "--skip-log-bin",
        "--innodb-buffer-pool-size=16M", f"--max-connections={max_connections}",
        f"--thread-handling={thread_handling}",
    ]  # fmt: skip
    proc = subprocess.Popen(group.enter_command(command), stdout=subprocess.DEVNULL)
    server = Server(proc, port, home, group, home)
    with stopped_at_end(server):
        wait_until(lambda: (home / "sock").exists() or proc.poll() is not None, 60, "mariadbd")
        assert proc.poll() is None, (home / "error.log").read_text()
        mariadb_query(server, f"CREATE USER '{IDLE_USER}'@'127.0.0.1'")
        yield server


def mariadb_query(server: Server, sql: str) -> list[list[str]]:
    """Rows of `sql`, run by the mariadb client as root over the server's Unix socket."""
    out = subprocess.run(
        ["mariadb", f"--socket={server.socket_dir}/sock", "-uroot", "-N", "-B", "-e", sql],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout  # fmt: skip
    return [line.split("\t") for line in out.splitlines()]


def mariadb_memory_used(server: Server) -> int:
    """The server's own count of the memory it allocated (global status Memory_used)."""
    ((_, value),) = mariadb_query(server, "SHOW GLOBAL STATUS LIKE 'Memory_used'")
    return int(value)


def _mysql_packet(s: socket.socket) -> tuple[int, bytes]:
    head = _exactly(s, 4)
    return head[3], _exactly(s, int.from_bytes(head[:3], "little"))


def _exactly(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        assert chunk, f"the server closed the connection ({len(out)} of {n} bytes)"
        out += chunk
    return out


def _mysql_send(s: socket.socket, seq: int, body: bytes) -> None:
    s.sendall(len(body).to_bytes(3, "little") + bytes([seq]) + body)


# LONG_PASSWORD | PROTOCOL_41 | SECURE_CONNECTION | PLUGIN_AUTH
_MYSQL_CAPS = 0x1 | 0x200 | 0x8000 | 0x80000


def mysql_connect(port: int) -> socket.socket:
    """A connection logged in as `idle` (the protocol's handshake, an empty password)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    seq, greeting = _mysql_packet(s)
    assert greeting[0] == 10, greeting[:64]  # protocol version 10
    body = struct.pack("<IIB23x", _MYSQL_CAPS, 1 << 24, 33) + IDLE_USER.encode() + b"\0"
    _mysql_send(s, seq + 1, body + b"\0" + b"mysql_native_password\0")
    _, reply = _mysql_packet(s)
    assert reply[:1] == b"\0", reply  # OK
    return s


def mysql_do(s: socket.socket, sql: str) -> None:
    """A statement that returns no rows (COM_QUERY, then its OK packet)."""
    _mysql_send(s, 0, b"\x03" + sql.encode())
    _, reply = _mysql_packet(s)
    assert reply[:1] == b"\0", reply


# --- PostgreSQL ----------------------------------------------------------------------------------
def postgres_cluster() -> tuple[Path, Path]:
    """(home, data directory) of a new cluster made by initdb as `postgres`, trusting local
    connections, with `idle` a role that may log in."""
    assert (PG_BIN / "postgres").exists(), "postgresql is not installed (scripts/bootstrap)"
    home = own_directory("postgres", "idlebuf-postgres-")
    data = home / "data"
    subprocess.run(
        as_user("postgres", [str(PG_BIN / "initdb"), "-D", str(data), "--auth=trust",
                             "-U", "postgres", "--no-sync"]),
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return home, data


def postgres_command(home: Path, data: Path, port: int, max_connections: int) -> list[str]:
    return as_user(
        "postgres",
        [str(PG_BIN / "postgres"), "-D", str(data), "-p", str(port), "-k", str(home),
         "-c", "listen_addresses=127.0.0.1", "-c", f"max_connections={max_connections}",
         "-c", "shared_buffers=16MB"],
    )  # fmt: skip


def _pg_message(s: socket.socket) -> tuple[bytes, bytes]:
    head = _exactly(s, 5)
    return head[:1], _exactly(s, int.from_bytes(head[1:], "big") - 4)


def pg_connect(port: int, user: str = "postgres") -> socket.socket:
    """A connection to database postgres, through its startup until ReadyForQuery."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    params = f"user\0{user}\0database\0postgres\0\0".encode()
    s.sendall(struct.pack(">ii", 8 + len(params), 196608) + params)
    while True:
        kind, body = _pg_message(s)
        assert kind != b"E", body
        if kind == b"R":
            assert body[:4] == b"\0\0\0\0", body  # AuthenticationOk (trust)
        if kind == b"Z":
            return s


def pg_query(s: socket.socket, sql: str) -> list[list[str | None]]:
    """The rows of `sql` (simple query protocol), as text."""
    body = sql.encode() + b"\0"
    s.sendall(b"Q" + struct.pack(">i", 4 + len(body)) + body)
    rows: list[list[str | None]] = []
    while True:
        kind, body = _pg_message(s)
        assert kind != b"E", body
        if kind == b"D":
            row, at = [], 2
            for _ in range(struct.unpack(">h", body[:2])[0]):
                (n,) = struct.unpack(">i", body[at : at + 4])
                at += 4
                row.append(None if n < 0 else body[at : at + n].decode())
                at += max(n, 0)
            rows.append(row)
        if kind == b"Z":
            return rows


def pg_ready(port: int) -> bool:
    """The server accepts logins (its socket exists before it has started up)."""
    try:
        with contextlib.closing(pg_connect(port)) as s:
            pg_query(s, "SELECT 1")
        return True
    except (OSError, AssertionError):
        return False


def children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        path = Path(f"/proc/{pid}/task/{pid}/children")
        return [int(c) for c in path.read_text().split()]
    return []


def backends_of(postmaster: int, clients: list[socket.socket]) -> list[int]:
    """The backend process serving each client (the postmaster's child holding its peer):
    /proc/net/tcp read once (it lists the whole machine's sockets)."""
    owner = {}
    for child in children(postmaster):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{child}/fd"):
                with contextlib.suppress(OSError):
                    owner[os.readlink(f"/proc/{child}/fd/{fd}")] = child
    by_port = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        link = f"socket:[{fields[9]}]"
        if fields[3] == "01" and link in owner:  # established, a backend's
            by_port[int(fields[2].rsplit(":", 1)[1], 16)] = owner[link]
    return [by_port[c.getsockname()[1]] for c in clients]


# --- Redis ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def redis(max_clients: int) -> Iterator[Server]:
    """redis-server as `redis`, on a free loopback port, nothing persisted."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed (scripts/bootstrap)"
    home = own_directory("redis", "idlebuf-redis-")
    port, group = free_port(), MemoryGroup("redis")
    command = as_user(
        "redis",
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
         "no", "--maxclients", str(max_clients), "--dir", str(home)],
    )  # fmt: skip
    proc = subprocess.Popen(group.enter_command(command), stdout=subprocess.DEVNULL)
    server = Server(proc, port, home, group, home)
    with stopped_at_end(server):
        wait_until(lambda: _redis_answers(port) or proc.poll() is not None, 30, "redis-server")
        assert proc.poll() is None, "redis-server exited"
        yield server


def redis_command(port: int, *command: str, s: socket.socket | None = None) -> bytes:
    """One command's reply (a simple string's line, or a bulk string's payload), on `s` or
    on a connection of its own."""
    own = s is None
    conn = s or socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        conn.sendall(f"*{len(command)}\r\n".encode())
        for part in command:
            conn.sendall(f"${len(part)}\r\n{part}\r\n".encode())
        reply = b""
        while True:
            chunk = conn.recv(65536)
            assert chunk, reply
            reply += chunk
            if b"\r\n" not in reply:
                continue
            head, _, body = reply.partition(b"\r\n")
            if not head.startswith(b"$"):
                assert not head.startswith(b"-"), head
                return head
            if len(body) >= int(head[1:]):
                return body[: int(head[1:])]
    finally:
        if own:
            conn.close()


def _redis_answers(port: int) -> bool:
    try:
        return redis_command(port, "PING").startswith(b"+PONG")
    except OSError:
        return False


def redis_info(port: int, section: str) -> dict[str, str]:
    text = redis_command(port, "INFO", section).decode()
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def redis_clients(port: int) -> list[dict[str, str]]:
    """CLIENT LIST, a dict per client (its id, fd, qbuf, omem, tot-mem...)."""
    text = redis_command(port, "CLIENT", "LIST").decode()
    return [dict(f.split("=", 1) for f in line.split()) for line in text.splitlines()]
