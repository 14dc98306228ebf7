"""Each grading kernel runs in a bubblewrap sandbox of its own.

What the kernel gets (``bwrap``, Debian's ``bubblewrap`` package):

- a read-only system (``/usr``, ``/etc``), the Python install, the virtual environment, the
  course package and the data (and model) cache, read-only;
- its own working folder (the submission's copy in ``autograded/<student>/<assignment>``) and a
  private run folder (its ZeroMQ sockets and the socket of the grader's check service), the only
  places it can write;
- a private ``/tmp`` of bounded size, no network (``--unshare-net``: nothing on the grader's
  loopback is reachable), its own PID namespace (every process it starts dies with it) and no
  capabilities (jupyter_client already starts it in a session of its own, with no terminal, which
  is also how its interrupt reaches it: no ``--new-session`` here);
- limits: memory (a memory cgroup where the machine lets the grader make one, else RLIMIT_AS),
  the number of processes (a pids cgroup, else RLIMIT_NPROC), CPU time (RLIMIT_CPU), file size,
  and, in ``SandboxedExecute``, the size of the output that is kept.

What it does not get: ``solutions/``, ``autograder/`` (the hidden tests, the references of the
unit being graded, the gradebook, the other students' folders), the grader's home folder, or any
other checkout on the machine. A unit whose checks have not yet moved out of the kernel (see
``RUNS_OUTSIDE_THE_KERNEL`` in ``autograder/hidden``) still needs its hidden tests and references
inside, read-only; ``autograder.checks`` says which.

Where bubblewrap is missing, kernels run unsandboxed and the grader says so loudly (``status()``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from jupyter_client.manager import AsyncKernelManager
from nbgrader.preprocessors import Execute

GiB = 1 << 30
MiB = 1 << 20


def _env_number(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)


@dataclass
class Limits:
    """Per-submission limits (read from the environment when a submission is graded). Each one
    that is hit shows as its own status in the gradebook."""

    memory_bytes: int = field(default_factory=lambda: int(_env_number("LLMCOURSE_MEMORY_LIMIT_GB", 4) * GiB))
    processes: int = field(default_factory=lambda: int(_env_number("LLMCOURSE_PROCESS_LIMIT", 512)))
    cpu_seconds: int = field(default_factory=lambda: int(_env_number("LLMCOURSE_CPU_LIMIT_S", 3600)))
    tmp_bytes: int = 256 * MiB
    file_bytes: int = 1 * GiB
    output_bytes: int = field(default_factory=lambda: int(_env_number("LLMCOURSE_OUTPUT_LIMIT_MB", 2) * MiB))

    def memory_label(self) -> str:
        return f"{self.memory_bytes / GiB:g} GiB"


@dataclass
class Spec:
    """One submission's sandbox: set by the grading process before nbgrader starts the kernel."""

    rundir: Path
    limits: Limits = field(default_factory=Limits)
    read_only: list[Path] = field(default_factory=list)          # extra read-only mounts, same path
    placed: list[tuple[Path, str]] = field(default_factory=list)  # (file, path relative to the workdir)
    env: dict[str, str] = field(default_factory=dict)
    unset_env: list[str] = field(default_factory=list)
    sandboxed: bool = True
    cgroups: Cgroups | None = None


ACTIVE: Spec | None = None   # the spec of the submission this process is grading


def activate(spec: Spec | None) -> None:
    global ACTIVE
    ACTIVE = spec


# --- is bubblewrap here, and does it work? -------------------------------------------------------

_PROBE: str | None = None


def unavailable_reason() -> str | None:
    """None when bubblewrap runs here; otherwise why not (and the grader runs unprotected)."""
    global _PROBE
    if os.environ.get("LLMCOURSE_NO_SANDBOX"):
        return "disabled by LLMCOURSE_NO_SANDBOX"
    if _PROBE is None:
        bwrap = shutil.which("bwrap")
        if bwrap is None:
            _PROBE = "bubblewrap is not installed (apt-get install bubblewrap)"
        else:
            try:
                run = subprocess.run([bwrap, "--ro-bind", "/", "/", "--unshare-net", "--unshare-pid",
                                      "--die-with-parent", "true"], capture_output=True, timeout=30)
                _PROBE = "" if run.returncode == 0 else f"bwrap does not run here: {run.stderr.decode()[:200]}"
            except (OSError, subprocess.SubprocessError) as err:
                _PROBE = f"bwrap does not run here: {err}"
    return _PROBE or None


WARNING = ("WARNING: bubblewrap is unavailable ({reason}); grading kernels run WITHOUT a sandbox: "
           "student code can read solutions/ and the hidden tests, write the gradebook and reach the "
           "network. See the README, 'Grading safely'.")


# --- cgroups: memory and process limits that a kill can be read back from ----------------------

class Cgroups:
    """A memory and a pids cgroup (cgroup v1, as on the course machines) for one kernel, under the
    grader's own. ``make`` returns None where they cannot be made (not root, or no cgroupfs)."""

    ROOT = Path("/sys/fs/cgroup")

    def __init__(self, dirs: dict[str, Path]):
        self.dirs = dirs

    @classmethod
    def make(cls, name: str, limits: Limits) -> Cgroups | None:
        dirs = {}
        try:
            for controller in ("memory", "pids"):
                base = cls.ROOT / controller
                if not (base / "cgroup.procs").exists():
                    raise OSError(f"no {controller} cgroup")
                own = _own_cgroup(controller)
                path = base / own.lstrip("/") / "llmcourse-grading" / name
                path.mkdir(parents=True, exist_ok=True)
                dirs[controller] = path
            (dirs["memory"] / "memory.limit_in_bytes").write_text(str(limits.memory_bytes))
            swap = dirs["memory"] / "memory.memsw.limit_in_bytes"
            if swap.exists():
                try:
                    swap.write_text(str(limits.memory_bytes))
                except OSError:
                    pass
            (dirs["pids"] / "pids.max").write_text(str(limits.processes))
        except OSError:
            for path in dirs.values():
                _rmdir(path)
            return None
        return cls(dirs)

    def join_command(self) -> str:
        """Shell words that move the current shell into the cgroups (before it execs the kernel)."""
        return "; ".join(f"echo $$ > {d / 'cgroup.procs'}" for d in self.dirs.values())

    def memory_limit_hit(self) -> bool:
        """Whether the kernel's memory cgroup killed a process for going over its limit."""
        try:
            control = (self.dirs["memory"] / "memory.oom_control").read_text()
            return any(line.startswith("oom_kill ") and int(line.split()[1]) > 0 for line in control.splitlines())
        except (OSError, ValueError):
            return False

    def process_limit_hit(self) -> bool:
        try:
            events = (self.dirs["pids"] / "pids.events").read_text()
            return any(line.startswith("max ") and int(line.split()[1]) > 0 for line in events.splitlines())
        except (OSError, ValueError):
            return False

    def kill_all(self) -> None:
        for path in self.dirs.values():
            try:
                for pid in (path / "cgroup.procs").read_text().split():
                    try:
                        os.kill(int(pid), 9)
                    except OSError:
                        pass
            except OSError:
                pass

    def remove(self) -> None:
        self.kill_all()
        for path in self.dirs.values():
            _rmdir(path)


def _own_cgroup(controller: str) -> str:
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controller in controllers.split(","):
                return path
    except OSError:
        pass
    return "/"


def _rmdir(path: Path) -> None:
    import time

    for _ in range(20):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.05)


# --- the kernel's command line --------------------------------------------------------------------

def _system_mounts() -> list[str]:
    args = ["--ro-bind", "/usr", "/usr", "--ro-bind", "/etc", "/etc"]
    for name in ("bin", "lib", "lib32", "lib64", "sbin"):
        path = Path("/") / name
        if path.is_symlink():
            args += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            args += ["--ro-bind", str(path), str(path)]
    return args


def python_mounts() -> list[Path]:
    """The Python install, the virtual environment and the course package (an editable install
    points into the repository, so only its package folder is mounted)."""
    import llmcourse

    paths = {Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve(),
             Path(llmcourse.__file__).resolve().parent}
    return sorted(paths)


def kernel_command(spec: Spec, cmd: list[str], workdir: Path) -> list[str]:
    """``cmd`` (the kernel's own argv) wrapped in the limits and, when available, in bwrap."""
    lim = spec.limits
    memory_rlimit = [] if spec.cgroups else [f"--as={lim.memory_bytes}"]
    process_rlimit = [] if spec.cgroups else [f"--nproc={lim.processes}"]
    limits = ["prlimit", f"--cpu={lim.cpu_seconds}", f"--fsize={lim.file_bytes}", "--core=0",
              *memory_rlimit, *process_rlimit, "--"]
    inner = limits + cmd
    if spec.sandboxed:
        # /tmp first: the binds below may lie under it (the run folder does) and must stay visible.
        mounts = ["--size", str(lim.tmp_bytes), "--tmpfs", "/tmp", *_system_mounts()]
        for path in [*python_mounts(), *spec.read_only]:
            if path.exists():
                mounts += ["--ro-bind", str(path), str(path)]
        # A GPU grader's kernels see its NVIDIA devices (CUDA_VISIBLE_DEVICES picks among them).
        for device in sorted(Path("/dev").glob("nvidia*")):
            mounts += ["--dev-bind-try", str(device), str(device)]
        mounts += ["--bind", str(spec.rundir), str(spec.rundir), "--bind", str(workdir), str(workdir)]
        for source, relative in spec.placed:
            mounts += ["--ro-bind", str(source), str(workdir / relative)]
        env = []
        # ipykernel exits when its parent's pid changes, and in a PID namespace it always looks
        # changed; --die-with-parent does that job instead.
        for name in ["JPY_PARENT_PID", *spec.unset_env]:
            env += ["--unsetenv", name]
        for name, value in {"HOME": str(workdir), "TMPDIR": "/tmp", "IPYTHONDIR": "/tmp/ipython",
                            "MPLCONFIGDIR": "/tmp/matplotlib", "JUPYTER_RUNTIME_DIR": "/tmp/jupyter",
                            **spec.env}.items():
            env += ["--setenv", name, value]
        inner = [shutil.which("bwrap") or "bwrap", "--unshare-pid", "--unshare-net", "--unshare-ipc",
                 "--unshare-uts", "--unshare-cgroup-try", "--die-with-parent",
                 "--cap-drop", "ALL", "--proc", "/proc", "--dev", "/dev", *mounts, *env,
                 "--chdir", str(workdir),
                 "--", *inner]
    # An interrupt (the per-cell time limit) is a SIGINT to the whole process group: bwrap must
    # ignore it, or it dies and takes the kernel with it; ipykernel sets its own handler.
    prelude = "trap '' INT; " + (spec.cgroups.join_command() + "; " if spec.cgroups else "")
    return ["/bin/sh", "-c", prelude + 'exec "$@"', "sh", *inner]


class SandboxedKernelManager(AsyncKernelManager):
    """A kernel manager whose kernel runs under ``kernel_command``; it talks over IPC sockets in
    the run folder, because loopback TCP does not reach a kernel without a network."""

    def __init__(self, **kwargs):
        spec = ACTIVE
        if spec is not None:
            kwargs.setdefault("transport", "ipc")
            kwargs.setdefault("ip", str(spec.rundir / "kernel"))
            kwargs.setdefault("connection_file", str(spec.rundir / "kernel.json"))
        super().__init__(**kwargs)

    def format_kernel_cmd(self, extra_arguments=None):
        cmd = super().format_kernel_cmd(extra_arguments)
        spec = ACTIVE
        if spec is None:
            return cmd
        workdir = Path(self._launch_args.get("cwd") or os.getcwd()).resolve()
        return kernel_command(spec, cmd, workdir)


class SandboxedExecute(Execute):
    """nbgrader's Execute, with the kernel in its sandbox and a cap on the output kept: past
    ``Limits.output_bytes`` of text, further output is dropped (one notice says so), so 100 MB
    printed by a loop never reaches the gradebook, the feedback or the grader's memory."""

    def __init__(self, *args, **kwargs):
        kwargs["kernel_manager_class"] = SandboxedKernelManager
        super().__init__(*args, **kwargs)
        self._output_bytes = 0
        self._output_cut = False

    def output(self, outs, msg, display_id, cell_index):
        limit = ACTIVE.limits.output_bytes if ACTIVE is not None else Limits().output_bytes
        content = msg.get("content", {})
        size = len(str(content.get("text", ""))) + sum(len(str(v)) for v in content.get("data", {}).values())
        self._output_bytes += size
        if self._output_bytes > limit and msg.get("msg_type") in ("stream", "display_data", "execute_result",
                                                                  "update_display_data"):
            if not self._output_cut:
                self._output_cut = True
                outs.append(self._cut_notice(limit))
            return None
        return super().output(outs, msg, display_id, cell_index)

    @staticmethod
    def _cut_notice(limit: int):
        from nbformat.v4 import new_output

        return new_output("stream", name="stderr",
                          text=f"[the grader kept the first {limit / MiB:g} MB of output and dropped the rest]\n")
