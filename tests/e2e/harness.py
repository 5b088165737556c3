"""Real processes for end-to-end tests: a LiveKit server on free ports, baton, tokens.

Everything here starts real programs (the pinned livekit-server, the release baton binary) and
stops them afterwards; nothing is mocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from livekit import api

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / ".tools" / "bin"
BATON_BIN = Path(os.environ.get("BATON_BIN", ROOT / "target" / "release" / "baton"))
API_KEY = "devkey"
API_SECRET = "baton-dev-secret-0123456789abcdef0123456789"


# Linux's default when /proc does not say (net.ipv4.ip_local_port_range, kernel docs ip-sysctl).
_EPHEMERAL_DEFAULT = (32768, 60999)
_handed_out: set[int] = set()


def ephemeral_port_range() -> tuple[int, int]:
    """The kernel's ephemeral (outgoing) port range, inclusive, from /proc or Linux's default."""
    try:
        low, high = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return _EPHEMERAL_DEFAULT
    return low, high


def _bindable(port: int, kind: int) -> bool:
    # Wildcard addresses, because livekit-server binds its ICE ports on every interface; on
    # Linux a wildcard bind fails if any address holds the port.
    families = [(socket.AF_INET, "0.0.0.0")]
    if socket.has_ipv6:
        families.append((socket.AF_INET6, "::"))
    for family, host in families:
        try:
            with socket.socket(family, kind) as s:
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind((host, port))
        except OSError as e:
            if family == socket.AF_INET6 and e.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                continue  # no IPv6 on this host: nothing can hold the port there
            return False
    return True


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port (TCP for SOCK_STREAM, UDP for SOCK_DGRAM) that is free now and outside the
    kernel's ephemeral range, so no outgoing connection can take it before or while the program
    we hand it to binds it (again, after a restart). Never the same port twice in one process."""
    low, high = ephemeral_port_range()
    candidates = [*range(1024, low), *range(high + 1, 65536)]
    for _ in range(200 if candidates else 0):
        port = random.choice(candidates)
        if port not in _handed_out and _bindable(port, kind):
            _handed_out.add(port)
            return port
    raise RuntimeError(f"no free port outside the ephemeral range {low}-{high}")


def spawn_logged(args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Starts `args` in a session of its own (so it can be killed with its children), stdout and
    stderr appended to `log_path`."""
    with log_path.open("ab") as log:
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


@dataclass
class LiveKitServer:
    """`livekit-server` with configs/livekit.yaml, on ports nobody else uses.

    It listens on three ports (`livekit-server` 1.13, no TURN configured): `port` (TCP: HTTP,
    websocket signal, server API), `udp_port` (ICE/UDP, one muxed port) and `tcp_port`
    (ICE/TCP). All come from `free_port`, so no outgoing connection takes one between `kill()`
    and `start()`."""

    port: int = field(default_factory=free_port)
    udp_port: int = field(default_factory=lambda: free_port(socket.SOCK_DGRAM))
    tcp_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(default_factory=lambda: Path(tempfile.mkstemp(prefix="livekit-", suffix=".log")[1]))

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> None:
        binary = TOOLS / "livekit-server"
        if not binary.exists():
            raise RuntimeError(f"{binary} missing: run ./scripts/setup")
        self.proc = spawn_logged(
            [
                str(binary),
                "--config",
                str(ROOT / "configs" / "livekit.yaml"),
                "--port",
                str(self.port),
                "--udp-port",
                str(self.udp_port),
                "--rtc.tcp_port",
                str(self.tcp_port),
            ],
            self.log_path,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"livekit-server exited: {self.log_tail()}")
            try:
                with urllib.request.urlopen(self.http_url, timeout=0.5) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"livekit-server not ready in {timeout}s: {self.log_tail()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """Stops the server abruptly, as a crash or a lost node would."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def token(
    identity: str,
    room: str,
    *,
    can_subscribe: bool = True,
    admin: bool = False,
    kind: str | None = None,
    attributes: dict[str, str] | None = None,
) -> str:
    grants = api.VideoGrants(
        room_join=True,
        room=room,
        can_publish=True,
        can_subscribe=can_subscribe,
        can_publish_data=True,
        # Agents publish their state (lk.agent.state) as an attribute, as livekit-agents does.
        can_update_own_metadata=kind == "agent",
        room_admin=admin,
    )
    t = api.AccessToken(API_KEY, API_SECRET).with_identity(identity).with_name(identity).with_grants(grants)
    if kind:
        t = t.with_kind(kind)  # type: ignore[arg-type]
    if attributes:
        t = t.with_attributes(attributes)
    return t.to_jwt()


class Baton:
    """A running `baton` process whose log lines are collected as they arrive."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        if not BATON_BIN.exists():
            raise RuntimeError(f"{BATON_BIN} missing: run ./scripts/setup")
        full_env = {**os.environ, "BATON_LOG": "info,lk_baton=debug", "NO_COLOR": "1", **(env or {})}
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [str(BATON_BIN), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,
        )
        self.lines: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = re.sub(r"\x1b\[[0-9;]*m", "", raw.decode(errors="replace").rstrip())
            with self._cond:
                self.lines.append((time.monotonic(), line))
                self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 10.0, start: int = 0) -> tuple[float, str]:
        """Waits for a log line matching `pattern` (searching from line index `start`)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for at, line in self.lines[start:]:
                    if rx.search(line):
                        return at, line
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise TimeoutError(f"no log line matching {pattern!r}; log:\n{self.text()}")
                self._cond.wait(min(left, 0.2))

    def text(self) -> str:
        with self._cond:
            return "\n".join(line for _, line in self.lines)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=2)
        return self.proc.returncode


def baton_join(server: LiveKitServer, room: str, *extra: str) -> Baton:
    return Baton(
        ["join", "--room", room, *extra],
        env={"LIVEKIT_URL": server.url, "LIVEKIT_API_KEY": API_KEY, "LIVEKIT_API_SECRET": API_SECRET},
    )


@contextlib.contextmanager
def joined_baton(server: LiveKitServer, room: str, *extra: str, ready: str = "joined: data channel open") -> object:
    """`baton join` that has logged `ready`; on the way out it must leave cleanly (exit 0)."""
    baton = baton_join(server, room, *extra)
    try:
        baton.wait_for(ready)
        yield baton
    except BaseException:
        print(baton.text())  # baton's log explains most failures
        raise
    finally:
        assert baton.stop() == 0, baton.text()


# The roster most handoff tests use: triage starts the call, billing can take it. A test's CONFIG
# appends its [handoff] settings.
TRIAGE_THEN_BILLING = """
[[agents]]
name = "triage"
start = true

[[agents]]
name = "billing"
"""


def config_file(text: str) -> str:
    """Writes a baton config (TOML text) to a temporary file; returns its path for `--config`."""
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(text)
    return f.name


async def wait_until(pred: Callable[[], object], timeout: float, what: str) -> None:
    """Polls `pred` every 10 ms; raises TimeoutError(`what`) if it is not true within `timeout` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.01)


def run(coro: object, timeout: float = 60.0) -> object:
    """Runs a coroutine to completion with an overall limit, so a hung test fails instead."""

    async def limited() -> object:
        return await asyncio.wait_for(coro, timeout)  # type: ignore[arg-type]

    return asyncio.run(limited())


@contextlib.contextmanager
def livekit_server() -> Iterator[LiveKitServer]:
    """A started `LiveKitServer`, stopped on the way out."""
    srv = LiveKitServer()
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def baton_worker(server: LiveKitServer, *extra: str, env: dict[str, str] | None = None) -> Baton:
    """`baton worker` registered on `server` with the dev credentials (extra flags appended).
    Its embedded room-state store is a fresh directory of its own unless ``BATON_STORE_PATH`` (or
    ``--store-path``) says otherwise, so no test finds another's rooms."""
    return Baton(
        ["worker", *extra],
        env={
            "LIVEKIT_URL": server.url,
            "LIVEKIT_API_KEY": API_KEY,
            "LIVEKIT_API_SECRET": API_SECRET,
            "BATON_STORE_PATH": tempfile.mkdtemp(prefix="baton-state-"),
            **(env or {}),
        },
    )


def dispatch_token(identity: str, room: str, agents: list[str]) -> str:
    """A caller token whose RoomConfiguration dispatches `agents` when this join creates the room."""
    return (
        api.AccessToken(API_KEY, API_SECRET)
        .with_identity(identity)
        .with_name(identity)
        .with_grants(api.VideoGrants(room_join=True, room=room, can_publish=True, can_subscribe=True))
        .with_room_config(api.RoomConfiguration(agents=[api.RoomAgentDispatch(agent_name=a) for a in agents]))
        .to_jwt()
    )


class Process(Baton):
    """Any already-started process whose stdout is collected like baton's (e.g. an agent worker)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.started = time.monotonic()
        self.proc = proc
        self.lines = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()


NO_PERSISTENCE = ("--save", "", "--appendonly", "no")


@dataclass
class RedisServer:
    """Debian's ``redis-server`` on a free loopback port with a working directory of its own and
    no persistence; ``kill()`` and ``start()`` again reuse the port, as a restarted Redis would."""

    port: int = field(default_factory=free_port)
    dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="redis-")))
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        binary = Path("/usr/bin/redis-server")
        if not binary.exists():
            raise RuntimeError(f"{binary} missing: apt-get install redis-server")
        args = [str(binary), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), *NO_PERSISTENCE]
        self.proc = spawn_logged(args, self.dir / "redis.log")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.dir / 'redis.log').read_text(errors='replace')}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server not ready in {timeout}s")

    def kill(self) -> None:
        """SIGKILL: Redis vanishes at once, with everything it held (no persistence)."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


@contextlib.contextmanager
def redis_server() -> Iterator[RedisServer]:
    """A started `RedisServer`, killed on the way out."""
    srv = RedisServer()
    srv.start()
    try:
        yield srv
    finally:
        srv.kill()


async def holder_of(room: str, workers: list[Baton], timeout: float) -> Baton:
    """The `baton worker` (of `workers`) whose baton took `room`'s lease (its `room lease taken`
    log line)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        for w in workers:
            if any(f"room={room}" in x and "room lease taken" in x for x in w.text().splitlines()):
                return w
        await asyncio.sleep(0.1)
    raise TimeoutError(f"no worker took the lease of {room}")
