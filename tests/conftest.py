import os

import pytest

# Never reach for the network in tests: dataset downloads fail fast, W&B stays offline.
os.environ.setdefault("ALLCONV_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

# Under pytest-xdist (`make test`: -n 2) each test process gets its share of the cores for
# torch's threads, and so does every plain process a test starts (a sweep's workers get
# theirs from the launcher). Left at torch's default, two processes each ran one thread per
# core: README's one-run example, two seeds at once, took 220 s of fit each on 2 cores
# instead of 40. Idle OpenMP threads sleep rather than spin, for the sweeps' workers that
# still share a core with the other test process. Set before torch is imported; a value
# already in the environment wins.
if (_xdist := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // _xdist)))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# tests/helpers.py asserts too: pytest rewrites its asserts as it does the test modules'
pytest.register_assert_rewrite("tests.helpers")

from tests.helpers import free_port  # noqa: E402


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty folder, so `runs/` and caches land in tmp_path."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --- a throwaway PostgreSQL server ---------------------------------------------------------

import glob  # noqa: E402
import pwd  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402


def _pg_bin(name):
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name)]
    return found[-1] if found and found[-1] else None


class PostgresServer:
    """initdb into a temp folder, pg_ctl on a free port, trust auth on 127.0.0.1.

    PostgreSQL refuses to run as root, so as root the server runs as the `postgres` user
    that Debian's package creates.
    """

    def __init__(self):
        self.initdb, self.pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
        self.dir = tempfile.mkdtemp(prefix="allconv-pg-")
        self.data = os.path.join(self.dir, "data")
        self.port = free_port()
        self.as_user = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self._run(self.initdb, "-D", self.data, "-A", "trust", "-U", "postgres", "-E", "UTF8")

    def _run(self, *cmd):
        subprocess.run([*self.as_user, *cmd], check=True, capture_output=True, timeout=120)

    def start(self):
        self._run(
            self.pg_ctl,
            "-D",
            self.data,
            "-l",
            os.path.join(self.dir, "log"),
            "-w",
            "-o",
            f"-p {self.port} -k {self.dir} -h 127.0.0.1",
            "start",
        )

    def stop(self, mode="fast"):
        self._run(self.pg_ctl, "-D", self.data, "-m", mode, "-w", "stop")

    def url(self, db):
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def create_db(self, db):
        import sqlalchemy

        engine = sqlalchemy.create_engine(self.url("postgres"), isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text(f'CREATE DATABASE "{db}"'))
        engine.dispose()
        return self.url(db)

    def cleanup(self):
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres():
    if not (_pg_bin("initdb") and _pg_bin("pg_ctl")):
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) are absent: apt-get install postgresql")
    server = PostgresServer()
    server.start()
    yield server
    server.cleanup()


# --- a one-node SLURM cluster ------------------------------------------------------------

from pathlib import Path  # noqa: E402

from ablations.process import free_ports  # noqa: E402

SLURM_BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue")


class SlurmCluster:
    """munged, slurmctld and slurmd of Debian's slurm-wlm, on free ports, in a temporary
    folder, with this machine as its one node (process tracking by /proc, no task plugin, so
    it needs no cgroups). Commands reach it with `env` (SLURM_CONF)."""

    def __init__(self) -> None:
        import socket

        self.dir = Path(tempfile.mkdtemp(prefix="slurm-"))
        self.node = socket.gethostname()
        self.procs: list[subprocess.Popen] = []
        d = self.dir
        (d / "state").mkdir()
        (d / "spool").mkdir()
        ctld, slurmd = free_ports(2)
        self.conf = d / "slurm.conf"
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=allconv",
                    f"SlurmctldHost={self.node}(127.0.0.1)",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    f"SlurmctldPort={ctld}",
                    f"SlurmdPort={slurmd}",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo=socket={d / 'munge.socket'}",
                    f"StateSaveLocation={d / 'state'}",
                    f"SlurmdSpoolDir={d / 'spool'}",
                    f"SlurmctldPidFile={d / 'slurmctld.pid'}",
                    f"SlurmdPidFile={d / 'slurmd.pid'}",
                    f"SlurmctldLogFile={d / 'slurmctld.log'}",
                    f"SlurmdLogFile={d / 'slurmd.log'}",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SchedulerType=sched/backfill",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core",
                    "ReturnToService=2",
                    "MpiDefault=none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "KillWait=10",
                    "MinJobAge=600",
                    f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} "
                    "RealMemory=1000 State=UNKNOWN",
                    "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self) -> None:
        d = self.dir
        key = d / "munge.key"
        subprocess.run(["mungekey", "-c", "-k", str(key)], check=True, capture_output=True)
        key.chmod(0o400)
        munge = [
            "munged", "-F", "-f", f"--socket={d / 'munge.socket'}", f"--key-file={key}",
            f"--pid-file={d / 'munged.pid'}", f"--log-file={d / 'munged.log'}",
            f"--seed-file={d / 'munged.seed'}",
        ]  # fmt: skip
        self._daemon(munge, "munged")
        wait_for(lambda: (d / "munge.socket").exists(), 20, "munged's socket")
        self._daemon(["slurmctld", "-D", "-c", "-f", str(self.conf)], "slurmctld")
        self._daemon(["slurmd", "-D", "-N", self.node, "-f", str(self.conf)], "slurmd")

        def idle() -> bool:
            out = subprocess.run(
                ["sinfo", "-h", "-o", "%t"], env=self.env, capture_output=True, text=True
            )
            return out.stdout.strip() == "idle"

        wait_for(idle, 60, f"the SLURM node to be idle (logs in {d})")

    def _daemon(self, argv: list[str], name: str) -> None:
        with open(self.dir / f"{name}.out", "w") as log:  # the daemon keeps its own copy
            self.procs.append(subprocess.Popen(argv, stdout=log, stderr=log, env=self.env))

    def scontrol(self, *args: str) -> str:
        out = subprocess.run(["scontrol", *args], env=self.env, capture_output=True, text=True)
        return out.stdout

    def cleanup(self) -> None:
        subprocess.run(["scancel", "--full", "-u", "root"], env=self.env, capture_output=True)
        for proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def wait_for(predicate, timeout: float, what: str) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.fixture(scope="session")
def slurm():
    missing = [b for b in SLURM_BINARIES if shutil.which(b) is None]
    if missing:
        pytest.skip(f"SLURM absent ({', '.join(missing)}): apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("a SLURM cluster of its own needs root here (slurmd runs jobs as their user)")
    cluster = SlurmCluster()
    try:
        cluster.start()
    except Exception:
        cluster.cleanup()
        raise
    yield cluster
    cluster.cleanup()
