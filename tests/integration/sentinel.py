"""A Redis deployment that fails over: one primary, one replica and three Sentinels, all real
``redis-server`` processes on free ports, started and stopped by the test that uses it."""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from tasks.localredis import free_port

MASTER = "refgen"
# Quick to notice a lost primary (production Sentinels wait longer, 5–30 s, to ride out
# a slow network; the steps that follow are the same).
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 5000
# More than loopback's socket buffers hold, well under a replica's output-buffer limit (64 MB).
_FILLER_MB = 32


class SentinelCluster:
    def __init__(self, *, password: str | None = None, sentinel_password: str | None = None):
        self.password = password
        self.sentinel_password = sentinel_password
        self.dir = Path(tempfile.mkdtemp(prefix="refgen-sentinel-"))
        self.primary_port = free_port()
        self.replica_port = free_port()
        self.sentinel_ports = [free_port() for _ in range(3)]
        self._servers: dict[int, subprocess.Popen[bytes]] = {}

    # --- for the processes under test ---------------------------------------------------

    @property
    def sentinels(self) -> str:
        """``REDIS_SENTINELS``."""
        return ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)

    @property
    def celery_url(self) -> str:
        """What a bare Celery client is given (README: upstream contract)."""
        auth = f":{self.password}@" if self.password else ""
        return ";".join(f"sentinel://{auth}127.0.0.1:{p}/0" for p in self.sentinel_ports)

    def env(self) -> dict[str, str]:
        env = {"REDIS_SENTINELS": self.sentinels, "REDIS_SENTINEL_MASTER": MASTER}
        if self.password:
            env["REDIS_PASSWORD"] = self.password
        if self.sentinel_password:
            env["REDIS_SENTINEL_PASSWORD"] = self.sentinel_password
        return env

    # --- lifecycle ------------------------------------------------------------------------

    def start(self, timeout_s: float = 30) -> SentinelCluster:
        """Every server and Sentinel up and agreed; when that fails, none is left running."""
        try:
            self._server(self.primary_port)
            self._server(self.replica_port, "--replicaof", "127.0.0.1", str(self.primary_port))
            self._wait(
                lambda: (
                    self.node(self.replica_port).info("replication").get("master_link_status")
                    == "up"
                ),
                "the replica to sync",
                timeout_s,
            )
            for port in self.sentinel_ports:
                self._sentinel(port)
            self._wait(
                self._sentinels_agree,
                "the Sentinels to know each other and the replica",
                timeout_s,
            )
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self._servers.values()]

    def stop(self) -> None:
        for process in self._servers.values():
            if process.poll() is None:
                process.kill()
                process.wait()
        self._servers.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> SentinelCluster:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    # --- faults ---------------------------------------------------------------------------

    def primary(self) -> int:
        """The port of the server the Sentinels call primary now."""
        _, port = self.sentinel_client().sentinel_get_master_addr_by_name(MASTER)
        return int(port)

    def kill_primary(self) -> int:
        """SIGKILL the primary, as a lost machine; its port."""
        port = self.primary()
        self._servers[port].kill()
        self._servers[port].wait()
        return port

    def pause(self, port: int) -> None:
        self._servers[port].send_signal(signal.SIGSTOP)

    def hold_back_replica(self) -> int:
        """Make the replica fall behind: paused, with the primary's link to it clogged, so the
        next writes stay on the primary alone. Pausing is not enough on one machine: the
        kernel's socket buffers (megabytes) would carry the writes to the paused replica, to be
        read when it resumes. So the primary first sends it more than those buffers hold.
        The replica's port, for ``resume``."""
        primary = self.node(self.primary())
        replica = next(p for p in (self.primary_port, self.replica_port) if p != self.primary())
        self.pause(replica)
        filler = "x" * (1 << 20)
        pipe = primary.pipeline(transaction=False)
        for i in range(_FILLER_MB):
            pipe.set(f"filler:{i}", filler)
        pipe.execute()
        return replica

    def resume(self, port: int) -> None:
        self._servers[port].send_signal(signal.SIGCONT)

    def wait_for_failover(self, old_primary: int, timeout_s: float = 30) -> int:
        """Until the Sentinels name a new primary and it accepts writes; its port."""

        def promoted() -> bool:
            port = self.primary()
            return port != old_primary and self.node(port).info("replication")["role"] == "master"

        self._wait(promoted, "a replica to be promoted", timeout_s)
        return self.primary()

    # --- clients for the test itself ------------------------------------------------------

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(
            port=port, password=self.password, decode_responses=True, socket_timeout=5
        )

    def sentinel_client(self) -> redis.Redis:
        """A client of the first Sentinel that answers."""
        for port in self.sentinel_ports:
            client = self._sentinel_at(port)
            try:
                client.ping()
                return client
            except redis.ConnectionError:
                continue
        raise RuntimeError("no Sentinel answers")

    # --- internals ------------------------------------------------------------------------

    def _sentinel_at(self, port: int) -> redis.Redis:
        return redis.Redis(
            port=port,
            password=self.sentinel_password,
            decode_responses=True,
            socket_timeout=2,
            socket_connect_timeout=1,
        )

    def _server(self, port: int, *extra: str) -> None:
        args = [
            _binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.dir),
            "--dbfilename",
            f"{port}.rdb",
        ]
        if self.password:
            args += ["--requirepass", self.password, "--masterauth", self.password]
        self._servers[port] = subprocess.Popen(
            [*args, *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self._wait(lambda: bool(self.node(port).ping()), f"redis-server on {port}")

    def _sentinel(self, port: int) -> None:
        lines = [
            f"port {port}",
            "bind 127.0.0.1",
            f"dir {self.dir}",
            f"sentinel monitor {MASTER} 127.0.0.1 {self.primary_port} 2",
            f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}",
            f"sentinel failover-timeout {MASTER} {FAILOVER_TIMEOUT_MS}",
            f"sentinel parallel-syncs {MASTER} 1",
        ]
        if self.password:
            lines.append(f"sentinel auth-pass {MASTER} {self.password}")
        if self.sentinel_password:
            lines.append(f"requirepass {self.sentinel_password}")
            lines.append(f"sentinel sentinel-pass {self.sentinel_password}")
        config = self.dir / f"sentinel-{port}.conf"
        config.write_text("\n".join(lines) + "\n")
        self._servers[port] = subprocess.Popen(
            [_binary(), str(config), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def _sentinels_agree(self) -> bool:
        for port in self.sentinel_ports:
            state = self._sentinel_at(port).sentinel_master(MASTER)
            if int(state["num-other-sentinels"]) < 2 or int(state["num-slaves"]) < 1:
                return False
        return True

    @staticmethod
    def _wait(ready: object, what: str, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if ready():  # type: ignore[operator]
                    return
            except (redis.RedisError, OSError, KeyError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"timed out waiting for {what}")


def _binary() -> str:
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("redis-server is not installed (Debian: apt-get install redis-server)")
    return found
