"""A real S3 endpoint on this machine for tests: moto's standalone server (the S3 HTTP API on
127.0.0.1, the endpoint s3fs's own tests use) behind a small TCP relay that a test can take down
for a while (moto keeps its buckets in memory, so stopping the server itself would lose them).

Credentials are enforced (moto's IAM checks, on after the three set-up calls that create a user,
its policy and its key): a wrong key is refused with 403 as by S3. Clients reach it through the usual
variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``), so torchrun and
SLURM jobs started with :attr:`S3Server.env` in their environment read from it as from S3.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

STARTUP_TIMEOUT_S = 30.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Relay:
    """Forwards TCP connections from a listening port to the server's; ``down`` closes the listening
    socket and every open connection (clients see a refused or reset connection, as from a store
    that stopped answering) and listens again after the given seconds."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.port = _free_port()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.listen()

    def listen(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self._listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by down()
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def down(self, seconds: float) -> threading.Thread:
        """Stop answering now and for ``seconds`` (in the background; join the thread returned to wait)."""
        assert self._listener is not None
        self._listener.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
                c.close()
            except OSError:
                pass
        t = threading.Thread(target=lambda: (time.sleep(seconds), self.listen()), daemon=True)
        t.start()
        return t

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()


class S3Server:
    """moto's server on a free loopback port, a relay in front, and a user with a key."""

    def __init__(self, log_path: Path) -> None:
        exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or shutil.which("moto_server")
        if exe is None:
            raise RuntimeError("moto_server is not installed (pip install 'moto[server]'; the test extra has it)")
        self.server_port = _free_port()
        env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(self.server_port)], stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env)
        self._wait_up()
        self.relay = _Relay(self.server_port)
        self.endpoint = f"http://127.0.0.1:{self.relay.port}"
        self.key_id, self.secret = self._make_user()

    def _wait_up(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.proc.returncode}; see {self._log.name}")
            try:
                socket.create_connection(("127.0.0.1", self.server_port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"moto_server did not listen within {STARTUP_TIMEOUT_S:.0f} s; see {self._log.name}")

    def _make_user(self) -> tuple[str, str]:
        import boto3

        iam = boto3.client("iam", endpoint_url=self.endpoint, region_name="us-east-1",
                           aws_access_key_id="setup", aws_secret_access_key="setup")
        iam.create_user(UserName="tests")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.put_user_policy(UserName="tests", PolicyName="all", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="tests")["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    @property
    def env(self) -> dict[str, str]:
        """What a client process needs in its environment (no other AWS setting leaks in: see
        :func:`client_env`)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.key_id,
                "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_DEFAULT_REGION": "us-east-1",
                # No ~/.aws of the host: the test's credentials only.
                "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.key_id, aws_secret_access_key=self.secret)

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def upload(self, folder: Path, url: str) -> str:
        """Every file under ``folder`` to ``url`` (``s3://bucket/prefix``), keys relative to ``folder``."""
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        s3 = self.client()
        for p in sorted(Path(folder).rglob("*")):
            if p.is_file():
                key = "/".join(x for x in (prefix.strip("/"), p.relative_to(folder).as_posix()) if x)
                s3.upload_file(str(p), bucket, key)
        return url

    def outage(self, seconds: float) -> threading.Thread:
        """The endpoint refuses connections for ``seconds`` from now."""
        return self.relay.down(seconds)

    def stop(self) -> None:
        self.relay.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
