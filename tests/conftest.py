import os

import pytest

# Never reach for the network in tests: dataset downloads fail fast, W&B stays offline.
os.environ.setdefault("ALLCONV_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

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
