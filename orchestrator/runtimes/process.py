"""Engines as local processes (the simulator, or vLLM without Docker).

Two ways to run one:

* Piped (no log file, no state dir): an asyncio child whose output fills a ring buffer. It lives
  and dies with the gateway (asyncio kills a child whose transport is dropped).
* Detached (a `spec.log_path`, or a `state_dir`): spawned in its own session with its output
  going straight to a file, so it outlives the gateway (no pipe to break when the gateway exits)
  and a restarted gateway can adopt it from its state file
  `<state_dir>/<profile_id>.json` = {pid, port, profile_id, base_url, cmdline, started_at,
  instance, log_path, start_ticks, api_key}. Without `spec.log_path` its output goes to
  `<state_dir>/<profile_id>.log`. The state file holds the engine's API key, so it is written
  0600: only the gateway's user (who can read the engine's /proc environ anyway) reads it.

Adoption checks that the pid still runs the recorded command line and started at the recorded
time (the kernel's start time in clock ticks), so a reused pid is never adopted or signalled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from orchestrator.runtimes.base import EngineSpec, RuntimeError_, RuntimeHandle, engine_key_env

log = structlog.get_logger(__name__)

_LOG_LINES = 500
# How often a detached engine is checked while it is being stopped.
_POLL_S = 0.05
# How long a SIGKILLed process may take to disappear before stop() gives up.
_KILL_GRACE_S = 10.0
_FILE_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")

# What an engine inherits from the gateway's environment: an allow-list, because the gateway's
# own secrets (JWT_SECRET, ADMIN_API_KEY, OPENAI_API_KEY, VLLM_API_KEY, HF_TOKEN, DATABASE_URL,
# ...) must never reach an engine (its logs, its crash dumps, whatever code a model repo runs).
# Everything else an engine needs comes through spec.env (orchestrator/specs.py builds it from
# the profile and settings) and the runtime (its API key). No VLLM_* or HF_* prefix: the
# gateway's own settings use both (VLLM_API_KEY, which vLLM would take as *its* key; HF_TOKEN),
# and the spec already passes what an engine needs of them (HF_HOME, HF_HUB_OFFLINE, HF_TOKEN
# for engines that download).
INHERITED_ENV = frozenset(
    {
        # Locating programs, the user and the locale.
        "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TERM",
        "TMPDIR", "TEMP", "TMP",
        # The interpreter (the simulator runs as `python -m simulator`).
        "PYTHONPATH", "VIRTUAL_ENV", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE",
        # Shared libraries of a CUDA install outside the default search path.
        "LD_LIBRARY_PATH",
        # Caches (vLLM, torch and Hugging Face put theirs under XDG_CACHE_HOME).
        "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_RUNTIME_DIR",
        # Model downloads behind a proxy or a private CA.
        "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
        "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
        # CPU threading of torch / tokenizers (the vLLM CPU build).
        "OMP_NUM_THREADS", "MKL_NUM_THREADS", "TOKENIZERS_PARALLELISM",
        "TRANSFORMERS_OFFLINE", "TRANSFORMERS_CACHE",
    }
)  # fmt: skip
INHERITED_ENV_PREFIXES = (
    "LC_",  # locale categories
    "CUDA_",
    "NVIDIA_",
    "TORCH_",
    "SIMULATOR_",  # the simulator's options (SIMULATOR_TOKENS_PER_SECOND, ...)
)
# Never inherited, even under an allowed prefix: names that say they hold a secret.
SECRET_NAME_SUFFIXES = ("_KEY", "_TOKEN", "_SECRET", "_PASSWORD")


@dataclass
class _Child:
    """A piped asyncio child."""

    process: asyncio.subprocess.Process
    logs: deque[str]
    reader: asyncio.Task[None]


@dataclass
class _Detached:
    """A process in its own session, writing to a file: spawned by us or adopted."""

    pid: int
    cmdline: list[str]
    start_ticks: int | None
    log_path: Path
    state_file: Path | None
    own: bool  # our child (we reap it) or adopted from a previous gateway
    exited: bool = False
    returncode: int | None = None  # known for our own children only


class ProcessRuntime:
    """Runs `spec.command` as a process in its own process group (SIGTERM, then SIGKILL)."""

    name = "process"

    def __init__(self, *, instance: str = "default", state_dir: Path | None = None) -> None:
        self._instance = instance
        self._state_dir = state_dir
        self._children: dict[str, _Child] = {}
        self._detached: dict[str, _Detached] = {}

    @property
    def instance(self) -> str:
        """The gateway instance whose engines this runtime runs and adopts."""
        return self._instance

    # -- protocol ----------------------------------------------------------------------------

    async def start(self, spec: EngineSpec) -> RuntimeHandle:
        """Spawn the command: detached (file output, state file) given a log path or state dir."""
        if not spec.command:
            raise RuntimeError_(f"profile {spec.profile_id!r}: process runtime needs a command")
        if spec.port is None:
            raise RuntimeError_(f"profile {spec.profile_id!r}: process runtime needs a port")
        log_path = spec.log_path
        if log_path is None and self._state_dir is not None:
            log_path = self._state_dir / f"{_file_stem(spec.profile_id)}.log"
        if log_path is None:
            return await self._start_piped(spec)
        return await asyncio.to_thread(self._start_detached, spec, log_path)

    async def stop(self, handle: RuntimeHandle, *, timeout_s: float = 20.0) -> None:
        """SIGTERM the group, SIGKILL it after the timeout; remove the state file."""
        child = self._children.pop(handle.id, None)
        if child is not None:
            await self._stop_piped(child, timeout_s)
            return
        detached = self._detached.pop(handle.id, None)
        if detached is not None:
            await self._stop_detached(detached, timeout_s)

    async def is_running(self, handle: RuntimeHandle) -> bool:
        """True while the engine has not exited."""
        child = self._children.get(handle.id)
        if child is not None:
            return child.process.returncode is None
        detached = self._detached.get(handle.id)
        return detached is not None and _still_running(detached)

    def logs_tail(self, handle: RuntimeHandle, lines: int = 50) -> list[str]:
        """The last lines of the engine's combined stdout/stderr (ring buffer or log file)."""
        if lines <= 0:
            return []
        child = self._children.get(handle.id)
        if child is not None:
            return list(child.logs)[-lines:]
        detached = self._detached.get(handle.id)
        return _file_tail(detached.log_path, lines) if detached else []

    def exit_code(self, handle: RuntimeHandle) -> int | None:
        """The exit code of an engine this runtime started, once it has exited."""
        child = self._children.get(handle.id)
        if child is not None:
            return child.process.returncode
        detached = self._detached.get(handle.id)
        if detached is not None:
            _still_running(detached)  # reaps it if it has exited
            return detached.returncode
        return None

    async def adopt(self) -> list[RuntimeHandle]:
        """Engines of this instance that still run (per their state files); stale files go."""
        if self._state_dir is None:
            return []
        return await asyncio.to_thread(self._adopt_sync, self._state_dir)

    # -- piped children ----------------------------------------------------------------------

    async def _start_piped(self, spec: EngineSpec) -> RuntimeHandle:
        try:
            process = await asyncio.create_subprocess_exec(
                *spec.command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=engine_environment({**spec.env, **engine_key_env(spec)}),
                # Its own group, so stop() also ends the engine's worker processes.
                start_new_session=True,
            )
        except OSError as exc:
            raise RuntimeError_(f"cannot start {spec.command[0]!r}: {exc}") from exc
        logs: deque[str] = deque(maxlen=_LOG_LINES)
        reader = asyncio.create_task(_pump(process, logs), name=f"logs-{spec.profile_id}")
        handle = RuntimeHandle(
            runtime=self.name,
            id=str(process.pid),
            base_url=f"http://127.0.0.1:{spec.port}",
            profile_id=spec.profile_id,
            api_key=spec.api_key,
        )
        self._children[handle.id] = _Child(process=process, logs=logs, reader=reader)
        return handle

    async def _stop_piped(self, child: _Child, timeout_s: float) -> None:
        if child.process.returncode is None:
            _signal_group(child.process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(child.process.wait(), timeout_s)
            except TimeoutError:
                _signal_group(child.process.pid, signal.SIGKILL)
                await child.process.wait()
            # The leader just exited: end whatever it left in its group (e.g. stray workers).
            _signal_group(child.process.pid, signal.SIGKILL)
        with contextlib.suppress(asyncio.CancelledError):
            await child.reader

    # -- detached processes ------------------------------------------------------------------

    def _start_detached(self, spec: EngineSpec, log_path: Path) -> RuntimeHandle:
        argv = list(spec.command)
        try:
            pid = _spawn(argv, engine_environment({**spec.env, **engine_key_env(spec)}), log_path)
        except OSError as exc:
            raise RuntimeError_(f"cannot start {argv[0]!r}: {exc}") from exc
        # /proc shows the command line as the kernel ran it (a script's interpreter included),
        # which is what adoption compares against later.
        cmdline = _settled_cmdline(pid) or argv
        base_url = f"http://127.0.0.1:{spec.port}"
        detached = _Detached(
            pid=pid,
            cmdline=cmdline,
            start_ticks=_proc_start_ticks(pid),
            log_path=log_path,
            state_file=None,
            own=True,
        )
        if self._state_dir is not None:
            state_file = self._state_dir / f"{_file_stem(spec.profile_id)}.json"
            state = {
                "pid": pid,
                "port": spec.port,
                "profile_id": spec.profile_id,
                "base_url": base_url,
                "cmdline": cmdline,
                "started_at": time.time(),
                "instance": self._instance,
                "log_path": str(log_path),
                "start_ticks": detached.start_ticks,
                # A restarted gateway adopts the engine: it must still be able to call it.
                "api_key": spec.api_key,
            }
            try:
                _write_json_atomically(state_file, state)
            except OSError as exc:
                _signal_group(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
                raise RuntimeError_(f"cannot write engine state file {state_file}: {exc}") from exc
            detached.state_file = state_file
        handle = RuntimeHandle(
            runtime=self.name,
            id=str(pid),
            base_url=base_url,
            profile_id=spec.profile_id,
            api_key=spec.api_key,
        )
        self._detached[handle.id] = detached
        return handle

    async def _stop_detached(self, detached: _Detached, timeout_s: float) -> None:
        try:
            # _still_running checks an adopted pid's identity, so a reused pid is never signalled.
            if _still_running(detached):
                _signal_engine(detached.pid, signal.SIGTERM)
                if not await _wait_exit(detached, timeout_s):
                    _signal_engine(detached.pid, signal.SIGKILL)
                    if not await _wait_exit(detached, _KILL_GRACE_S):
                        raise RuntimeError_(
                            f"engine process {detached.pid} did not exit after SIGKILL"
                        )
                # The leader just exited: end whatever it left in its group (stray workers).
                _signal_group(detached.pid, signal.SIGKILL)
        finally:
            if detached.state_file is not None:
                _remove_state_file(detached.state_file, detached.pid)

    def _adopt_sync(self, state_dir: Path) -> list[RuntimeHandle]:
        handles: list[RuntimeHandle] = []
        if not state_dir.is_dir():
            return handles
        for state_file in sorted(state_dir.glob("*.json")):
            try:
                state = json.loads(state_file.read_text())
                instance = str(state["instance"])
                detached = _Detached(
                    pid=int(state["pid"]),
                    cmdline=[str(arg) for arg in state["cmdline"]],
                    start_ticks=None
                    if state.get("start_ticks") is None
                    else int(state["start_ticks"]),
                    log_path=Path(state["log_path"]),
                    state_file=state_file,
                    own=False,
                )
                api_key = state.get("api_key")
                handle = RuntimeHandle(
                    runtime=self.name,
                    id=str(detached.pid),
                    base_url=str(state["base_url"]),
                    profile_id=str(state["profile_id"]),
                    # None: a state file from before engines had keys (the engine has none).
                    api_key=None if api_key is None else str(api_key),
                )
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("engine_state_file_unreadable", path=str(state_file), error=str(exc))
                with contextlib.suppress(OSError):
                    state_file.unlink()
                continue
            if instance != self._instance:
                continue  # another gateway instance's engine: not ours to judge
            if handle.id in self._detached or handle.id in self._children:
                handles.append(handle)  # started by this runtime: already known
                continue
            if not (_pid_alive(detached.pid) and _is_same_process(detached)):
                log.info("engine_state_file_stale", path=str(state_file), pid=detached.pid)
                with contextlib.suppress(OSError):
                    state_file.unlink()
                continue
            log.info("engine_adopted", profile=handle.profile_id, pid=detached.pid)
            self._detached[handle.id] = detached
            handles.append(handle)
        return handles


# -- helpers -----------------------------------------------------------------------------------


def engine_environment(
    spec_env: Mapping[str, str], base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """An engine's environment: the allow-listed part of `base` (the gateway's), then `spec_env`.

    `base` defaults to os.environ. The profile's and the gateway's choices (spec_env: the spec's
    env and the engine's API key) win.
    """
    base = os.environ if base is None else base
    env = {
        key: value
        for key, value in base.items()
        if (key in INHERITED_ENV or key.startswith(INHERITED_ENV_PREFIXES))
        and not key.upper().endswith(SECRET_NAME_SUFFIXES)
    }
    env.update(spec_env)
    return env


def _file_stem(profile_id: str) -> str:
    """The profile id, made safe as a file name in the state dir."""
    stem = _FILE_UNSAFE.sub("_", profile_id)
    return stem if stem and not stem.startswith(".") else f"_{stem}"


def _spawn(argv: list[str], env: dict[str, str], log_path: Path) -> int:
    """Start `argv` in a new session with stdin /dev/null and stdout+stderr into `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
    try:
        return os.posix_spawnp(
            argv[0],
            argv,
            env,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, fd, 1),
                (os.POSIX_SPAWN_DUP2, fd, 2),
            ],
            # Python ignores SIGPIPE and SIGXFSZ; the engine gets the defaults back (as with
            # subprocess), and no blocked signals.
            setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
            setsigmask=(),
            setsid=True,
        )
    finally:
        os.close(fd)


def _write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    """Write `data` as `path` in one step, readable by this user only (it holds an API key)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # Created 0600 from the start (no window in which the umask's mode applies); a leftover
    # temporary file of a crashed write is replaced.
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _remove_state_file(path: Path, pid: int) -> None:
    """Remove `path` unless it now describes another process (a later start of the profile)."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        if int(json.loads(path.read_text())["pid"]) == pid:
            path.unlink()


def _proc_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [arg.decode(errors="surrogateescape") for arg in raw.split(b"\0")[:-1]]


def _settled_cmdline(pid: int, within_s: float = 1.0) -> list[str]:
    """The command line of a just-spawned process, once the kernel has set it up.

    posix_spawn (vfork) returns as soon as the child has swapped in its new memory, a moment
    before the kernel has put the new argv (and environ) there: read at once, /proc may show
    an empty command line. Empty if the process exits or never shows one within `within_s`.
    """
    deadline = time.monotonic() + within_s
    while True:
        cmdline = _proc_cmdline(pid)
        if cmdline or not _pid_alive(pid) or time.monotonic() >= deadline:
            return cmdline
        time.sleep(0.001)


def _proc_stat_fields(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name: [state, ppid, ...]; empty if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    # The command name (field 2) is in parentheses and may itself contain spaces or ')'.
    return raw[raw.rfind(")") + 2 :].split()


def _proc_start_ticks(pid: int) -> int | None:
    fields = _proc_stat_fields(pid)
    # Field 22 of stat (starttime) is the 20th after the command name.
    return int(fields[19]) if len(fields) > 19 else None


def _pid_alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie."""
    fields = _proc_stat_fields(pid)
    if fields:
        return fields[0] not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # No /proc here (not Linux): a zombie cannot be told apart.
    return not Path("/proc/self").exists()


def _is_same_process(detached: _Detached) -> bool:
    """For adoption: the pid runs the recorded command line and started when recorded."""
    if _proc_cmdline(detached.pid) != detached.cmdline:
        return False
    return detached.start_ticks is None or _proc_start_ticks(detached.pid) == detached.start_ticks


def _still_running(detached: _Detached) -> bool:
    """Whether the engine runs; reaps our own children, checks an adopted pid's identity."""
    if detached.exited:
        return False
    if detached.own:
        # Our child's pid cannot be reused before we reap it here.
        try:
            pid, status = os.waitpid(detached.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = detached.pid, None  # reaped elsewhere: exited, code unknown
        if pid == 0:
            return True
        detached.exited = True
        detached.returncode = None if status is None else os.waitstatus_to_exitcode(status)
        return False
    # Adopted: the start time identifies the process even if it changed its title since.
    running = _pid_alive(detached.pid) and (
        _proc_start_ticks(detached.pid) == detached.start_ticks
        if detached.start_ticks is not None
        else _proc_cmdline(detached.pid) == detached.cmdline
    )
    detached.exited = not running
    return running


async def _wait_exit(detached: _Detached, timeout_s: float) -> bool:
    """Poll until the process has exited (True) or the timeout passes (False)."""
    deadline = time.monotonic() + timeout_s
    while _still_running(detached):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(_POLL_S)
    return True


def _file_tail(path: Path, lines: int) -> list[str]:
    """The last `lines` lines of a text file (reads only its end)."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            start = max(0, size - max(64 * 1024, lines * 1024))
            f.seek(start)
            data = f.read()
    except OSError:
        return []
    text = data.decode(errors="replace").splitlines()
    if start > 0 and text:
        text = text[1:]  # the first line is cut
    return text[-lines:]


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _signal_engine(pid: int, sig: signal.Signals) -> None:
    """Signal the engine's process group, or the process alone if it leads no group."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


async def _pump(process: asyncio.subprocess.Process, logs: deque[str]) -> None:
    assert process.stdout is not None
    async for raw in process.stdout:
        logs.append(raw.decode(errors="replace").rstrip())
