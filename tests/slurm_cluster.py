"""A real two-node Slurm cluster on this one machine, for tests: munged, slurmctld and `slurmd -N n1` / `-N n2`.

Everything lives in one temporary folder (config, state, spool, logs, munge socket) on ports picked at start, so
several clusters can run side by side without touching the machine's own Slurm or munge. Commands reach it through
`SLURM_CONF`. `stop()` cancels every job, kills whatever still carries this cluster's `SLURM_CONF` (job steps
included) and stops the daemons; it is safe to call twice and after a failed start.
"""
from __future__ import annotations

import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel")
NODES = ("n1", "n2")


def missing_tools() -> list[str]:
    return [t for t in DAEMONS if shutil.which(t) is None and not os.path.exists(f"/usr/sbin/{t}")]


def _which(tool: str) -> str:
    return shutil.which(tool) or f"/usr/sbin/{tool}"


def _die_with_parent() -> None:
    """preexec_fn: the daemon gets SIGTERM if the test process dies without running stop() (e.g. killed)."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SlurmCluster:
    def __init__(self, cred_expire_s: int = 5):
        self.root = Path(tempfile.mkdtemp(prefix="slurm-test-", dir="/tmp"))
        self.root.chmod(0o755)  # munged runs as user munge and must reach its socket folder
        self.conf = self.root / "slurm.conf"
        self.cred_expire_s = cred_expire_s
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        for var in [v for v in self.env if v.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
            if var != "SLURM_CONF":
                del self.env[var]  # a test run inside a Slurm job must not leak that job's settings

    # -- life cycle -------------------------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> "SlurmCluster":
        self._start_munge()
        self._write_conf()
        self._spawn([_which("slurmctld"), "-D", "-i"], "slurmctld.out")
        for node in NODES:
            self._spawn([_which("slurmd"), "-D", "-N", node], f"slurmd.{node}.out")
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = self.cmd("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split("\n")
            idle = {line.split()[0] for line in out if line.endswith(" idle")}
            if idle >= set(NODES):
                return self
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited with {p.returncode} at start\n{self.logs()}")
            time.sleep(0.5)
        raise RuntimeError(f"the 2 nodes were not idle within {timeout}s\n{self.logs()}")

    def _start_munge(self) -> None:
        mdir = self.root / "munge"
        mdir.mkdir()
        mdir.chmod(0o755)  # munged insists that every client can reach its socket
        user = pwd.getpwnam("munge")
        os.chown(mdir, user.pw_uid, user.pw_gid)
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            raise RuntimeError(f"{key} is missing: reinstall munge (scripts/setup_slurm.sh)")
        self.munge_socket = mdir / "munge.socket"
        self._spawn(["runuser", "-u", "munge", "--", _which("munged"), "-F", f"--socket={self.munge_socket}",
                     f"--key-file={key}", f"--pid-file={mdir}/munged.pid", f"--log-file={mdir}/munged.log",
                     f"--seed-file={mdir}/munged.seed"], "munged.out")
        deadline = time.time() + 20
        while not self.munge_socket.exists():
            if time.time() > deadline or self.procs[-1].poll() is not None:
                raise RuntimeError(f"munged did not start\n{self.logs()}")
            time.sleep(0.1)

    def _write_conf(self) -> None:
        ctld_port, *node_ports = _free_ports(1 + len(NODES))
        # Random job ids: train.sbatch derives MASTER_PORT from the job id, and clusters may run side by side.
        host = socket.gethostname()
        r = self.root
        for d in ("state", "spool"):
            (r / d).mkdir()
        nodes = "\n".join(f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} CPUs=1 State=UNKNOWN"
                          for n, p in zip(NODES, node_ports))
        self.conf.write_text(f"""\
ClusterName=pytest
FirstJobId={random.randint(1000, 900000)}
SlurmctldHost={host}
SlurmctldPort={ctld_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire_s}
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
MpiDefault=none
ReturnToService=2
MinJobAge=3600
KillWait=10
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.%n.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd.%n.log
{nodes}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
""")

    def _spawn(self, argv: list[str], out: str) -> None:
        with open(self.root / out, "wb") as f:
            self.procs.append(subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=self.env,
                                               start_new_session=True, preexec_fn=_die_with_parent))

    def stop(self) -> None:
        if self.conf.exists() and any(p.poll() is None for p in self.procs):
            self.cmd("scancel", "--user", "root", check=False, timeout=20)
            deadline = time.time() + 20
            while time.time() < deadline and self.cmd("squeue", "-h", check=False, timeout=20).stdout.strip():
                time.sleep(0.5)
        self._kill_tagged()
        for p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=15)
        self._kill_tagged()
        self.procs.clear()

    def _kill_tagged(self) -> None:
        """SIGKILL every process that carries this cluster's SLURM_CONF (stray job steps), except this one."""
        tag = f"SLURM_CONF={self.conf}".encode()
        for pid in [int(d) for d in os.listdir("/proc") if d.isdigit() and int(d) != os.getpid()]:
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if tag in f.read().split(b"\0"):
                        os.kill(pid, signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    # -- commands ---------------------------------------------------------------------------------------------
    def cmd(self, *argv, check=True, timeout=60, cwd=None) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(argv), capture_output=True, text=True, env=self.env, timeout=timeout, cwd=cwd)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, argv))} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def sbatch(self, *argv, cwd, env=None) -> str:
        """Submit; returns the job id."""
        proc = subprocess.run(["sbatch", "--parsable", *map(str, argv)], capture_output=True, text=True,
                              env={**self.env, **(env or {})}, timeout=60, cwd=cwd)
        if proc.returncode != 0:
            raise AssertionError(f"sbatch {' '.join(map(str, argv))} exited {proc.returncode}: {proc.stderr}")
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); completed jobs stay for MinJobAge."""
        out = self.cmd("scontrol", "show", "job", "-o", job_id).stdout
        return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", out))

    def wait(self, job_id: str, timeout: float, until=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                                       "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")) -> dict:
        """Poll until the job reaches one of the `until` states; returns its final record."""
        deadline = time.time() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in until:
                return info
            if time.time() > deadline:
                raise AssertionError(f"job {job_id} still {info.get('JobState')} after {timeout}s\n{self.logs()}")
            time.sleep(0.5)

    def logs(self, tail: int = 3000) -> str:
        parts = []
        for f in sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.out")):
            parts.append(f"--- {f.name}\n{f.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)
