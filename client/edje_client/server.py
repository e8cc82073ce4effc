"""Run the real ``tritonserver`` binary that ships in the ``nvidia-pytriton`` wheel.

The wheel carries Triton 2.51 with the Python backend, one backend stub per Python version, and
the shared libraries they link against. :class:`TritonServer` assembles a backend directory for
the running interpreter, starts the server on loopback by default, waits for readiness, and
stops it cleanly. It is what ``edje serve``, ``make serve`` and the test fixtures use. Its
failures raise :class:`~edje_client.errors.LaunchError`, an ``EDJEError`` like every other.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from edje_client.errors import LaunchError

DEFAULT_HOST = "127.0.0.1"
PR_SET_PDEATHSIG = 1


def pytriton_root() -> Path:
    """Directory of the Triton distribution inside the ``nvidia-pytriton`` wheel."""
    try:
        import pytriton
    except ImportError as exc:
        raise LaunchError(
            "the embedded server needs the nvidia-pytriton wheel: pip install 'edje-triton[serve]'"
        ) from exc
    return Path(pytriton.__file__).parent / "tritonserver"


def backend_directory(cache_dir: Path | None = None) -> Path:
    """A Triton backend directory whose ``python/`` backend matches this interpreter.

    It holds ``libtriton_python.so``, ``triton_python_backend_utils.py`` and the stub built
    for ``python3.X``; files are copied once into a cache directory.
    """
    root = pytriton_root()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise LaunchError(f"nvidia-pytriton ships no Python backend stub for Python {version}")
    cache_dir = (
        cache_dir
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        / "edje"
        / f"triton-backends-py{version}"
    )
    target = cache_dir / "python"
    target.mkdir(parents=True, exist_ok=True)
    sources = [
        root / "backends" / "python" / "libtriton_python.so",
        root / "backends" / "python" / "triton_python_backend_utils.py",
        stub,
    ]
    for src in sources:
        dst = target / src.name
        if not dst.exists() or dst.stat().st_size != src.stat().st_size:
            tmp = dst.with_suffix(dst.suffix + ".tmp")
            shutil.copy2(src, tmp)
            os.replace(tmp, dst)
    return cache_dir


def server_environment() -> dict[str, str]:
    """Environment for ``tritonserver`` and its Python stubs.

    The stubs link against libraries bundled in the wheel (``nvidia_pytriton.libs``) and
    against this interpreter's ``libpython``; the Python models import packages from this
    interpreter's site-packages.
    """
    root = pytriton_root()
    env = dict(os.environ)
    libs = [str(root.parent.parent / "nvidia_pytriton.libs"), sysconfig.get_config_var("LIBDIR")]
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libs if p)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Ask Linux to SIGTERM the server if the process that started it dies (no orphans)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def port_is_free(host: str, port: int) -> bool:
    """True when ``host:port`` can be bound right now by a server.

    ``SO_REUSEADDR``, as servers set it: connections of an earlier server still in TIME_WAIT do
    not count, a process listening on the port does.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def find_free_port(host: str = DEFAULT_HOST) -> int:
    """A port the OS reports free on ``host`` (for tests and ``--http-port 0``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class TritonServer:
    """A ``tritonserver`` process serving one model repository.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. Ports of 0 are replaced
    by free ports. The model-control API is off unless ``model_control_mode="explicit"``.
    """

    model_repository: Path
    host: str = DEFAULT_HOST
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    model_control_mode: str = "none"
    log_file: Path | None = None
    log_verbose: int = 0
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.model_repository = Path(self.model_repository).resolve()
        self.http_port = self.http_port or find_free_port(self.host)
        self.grpc_port = self.grpc_port or find_free_port(self.host)
        self.metrics_port = self.metrics_port or find_free_port(self.host)

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def url(self, protocol: str) -> str:
        """``host:port`` for ``"http"`` or ``"grpc"``."""
        return {"http": self.http_url, "grpc": self.grpc_url}[protocol]

    def command(self) -> list[str]:
        """The ``tritonserver`` command line."""
        return [
            str(pytriton_root() / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backend_directory()}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            f"--model-control-mode={self.model_control_mode}",
            *(["--load-model=*"] if self.model_control_mode == "explicit" else []),
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            "--exit-on-error=true",
            "--strict-readiness=true",
            f"--log-verbose={self.log_verbose}",
            *self.extra_args,
        ]

    @property
    def logs_to_stdout(self) -> bool:
        """``log_file`` ``-``: the server writes to this process's stdout (containers)."""
        return str(self.log_file) == "-"

    def log_tail(self, n: int = 40) -> str:
        """The last ``n`` lines of the server log (empty when it goes to stdout)."""
        if self.log_file is None or self.logs_to_stdout or not Path(self.log_file).exists():
            return ""
        lines = Path(self.log_file).read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def start(self, timeout: float = 180.0) -> TritonServer:
        """Start the server and block until ``/v2/health/ready``; raise with its log on failure."""
        if not (self.model_repository / "").is_dir():
            raise LaunchError(f"model repository not found: {self.model_repository}")
        for name, port in (
            ("HTTP", self.http_port),
            ("gRPC", self.grpc_port),
            ("metrics", self.metrics_port),
        ):
            if not port_is_free(self.host, port):
                raise LaunchError(
                    f"{name} port {port} on {self.host} is already in use; "
                    f"pick another (--{name.lower()}-port, or {name.upper()}_PORT=... for make)"
                )
        if self.log_file is None:
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            self.log_file = Path(name)
        log = None if self.logs_to_stdout else open(self.log_file, "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            self.command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=server_environment(),
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        if log is not None:
            log.close()  # the child holds its own descriptor
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                # A server that dies while starting (Triton's Python backend can abort) leaves
                # its backend stubs running in its process group: take them down with it.
                self._kill_group()
                raise LaunchError(
                    f"tritonserver exited with code {self.process.returncode} while starting; "
                    f"log {self.log_file}:\n{self.log_tail()}"
                )
            if self.is_ready():
                return self
            time.sleep(0.25)
        self.stop()
        raise LaunchError(f"tritonserver not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def is_ready(self) -> bool:
        """True when ``/v2/health/ready`` answers 200 and the metrics port accepts connections.

        Triton may open its metrics endpoint a moment after it reports ready; a caller that
        scrapes right away must not race it.
        """
        url = f"http://{self.http_url}/v2/health/ready"
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status != 200:
                    return False
            with socket.create_connection((self.host, self.metrics_port), timeout=1):
                return True
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the server to exit (SIGINT), then kill it if it does not within ``timeout``."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill_group()
            self.process.wait()

    def _kill_group(self) -> None:
        """SIGKILL the server's process group (its backend stubs too), if any of it is left."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def wait(self) -> int:
        """Block until the server exits; return its exit code."""
        if self.process is None:
            raise LaunchError("server not started")
        return self.process.wait()

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
