"""Least privilege and transport security, on real redis-servers.

The library runs as the ACL users of README's "Least privilege" block (parsed from the
README, so the documented rules are the tested ones): the counter store's user and the lock
masters' user may run only the commands and touch only the keys and channels the library
needs. Where the redis-server was built with TLS, the same runs go over ``rediss://``.

Each server also has a ``default`` user limited to PING and INFO (the embedded server's
readiness probe) and an ``admin`` user the tests use to flush and to read ``ACL LOG``: an
empty ACL LOG after a run means the library never hit a command or key outside its rule.

Credentials must never show: a distinctive password is searched for in log records,
exception texts (with their causes), the metrics exposition and the CLI's output.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from redis.asyncio import Redis
from redis.exceptions import NoPermissionError

from coordinator import ReseedCoordinator, StoreError
from coordinator.budget import BudgetGuard
from coordinator.budget.spend_source import PostgresSpendSource
from coordinator.lab.cli import main
from coordinator.lab.embedded import EmbeddedServerError, EmbeddedServers, RedisServer
from coordinator.lab.embedded.process import free_port
from coordinator.metrics import PrometheusObserver

README = Path(__file__).resolve().parents[1] / "README.md"
README_PASSWORD = ">CHANGE-ME"  # the placeholder in the README's rules
STORE_USER, LOCK_USER = "reseed-store", "reseed-lock"
# Distinctive, so that finding it anywhere in an output can only be a leak.
PASSWORD = "Zq7-acl-secret-4kW9"
WRONG_PASSWORD = "Zq7-wrong-secret-8pT3"
ADMIN_PASSWORD = "Zq7-admin-secret-2mR5"
SECRETS = (PASSWORD, WRONG_PASSWORD, ADMIN_PASSWORD)
KEY = "litellm:spend:team:t1"
DB_VALUE = 100.0
# A TLS handshake costs redis-py tens of ms of CPU (a fresh SSL context per connection): a
# burst of cold connections on a busy machine outlasts the default 0.3/0.5 s timeouts.
TIMEOUTS = {"socket_timeout": 5.0, "lock_timeout": 5.0}


def readme_rules() -> dict[str, list[str]]:
    """The ``user ...`` lines of README's "Least privilege" subsection: name -> rule words."""
    section = README.read_text().split("### Least privilege", 1)[1].split("\n## ", 1)[0]
    rules = {}
    for line in section.splitlines():
        if line.startswith("user "):
            name, *words = line.split()[1:]
            rules[name] = words
    return rules


def user_config(name: str) -> list[str]:
    words = readme_rules()[name]
    assert README_PASSWORD in words, words
    rule = [f">{PASSWORD}" if word == README_PASSWORD else word for word in words]
    return [
        "--user", "default", "on", "nopass", "resetkeys", "-@all", "+ping", "+info",
        "--user", "admin", "on", f">{ADMIN_PASSWORD}", "~*", "&*", "+@all",
        "--user", name, *rule,
    ]  # fmt: skip


@dataclass(frozen=True)
class Tls:
    """A CA and a server certificate for 127.0.0.1, made with the openssl command."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def make(cls, directory: Path) -> Tls:
        tls = cls(directory / "ca.crt", directory / "server.crt", directory / "server.key")
        ca_key, csr = directory / "ca.key", directory / "server.csr"
        ext = directory / "san.ext"
        ext.write_text("subjectAltName=IP:127.0.0.1\n")
        for command in (
            ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", "/CN=reseed-test-ca", "-keyout", ca_key, "-out", tls.ca],
            ["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
             "-keyout", tls.key, "-out", csr],
            ["x509", "-req", "-in", csr, "-CA", tls.ca, "-CAkey", ca_key, "-CAcreateserial",
             "-days", "2", "-extfile", ext, "-out", tls.cert],
        ):  # fmt: skip
            subprocess.run(["openssl", *map(str, command)], check=True, capture_output=True)
        return tls

    def config(self, port: int) -> list[str]:
        return [
            "--tls-port", str(port),
            "--tls-cert-file", str(self.cert),
            "--tls-key-file", str(self.key),
            "--tls-ca-cert-file", str(self.ca),
            "--tls-auth-clients", "no",
        ]  # fmt: skip


@dataclass
class Node:
    """One server: the URL the library uses (its restricted user, over TLS if enabled) and
    the admin URL (plain port) the tests use."""

    server: RedisServer
    url: str
    admin_url: str


@dataclass
class Deployment:
    store: Node
    masters: list[Node]

    @property
    def nodes(self) -> list[Node]:
        return [self.store, *self.masters]

    def coordinator(self, **options: Any) -> ReseedCoordinator:
        return ReseedCoordinator.from_urls(
            self.store.url, lock_urls=[m.url for m in self.masters], **TIMEOUTS, **options
        )


def start_node(user: str, tls: Tls | None, stack: list[RedisServer]) -> Node:
    tls_port = free_port("127.0.0.1") if tls else None
    extra = tls.config(tls_port) if tls and tls_port else []
    server = RedisServer(extra_args=[*user_config(user), *extra])
    stack.append(server)
    server.start()
    if tls and tls_port:
        url = f"rediss://{user}:{PASSWORD}@127.0.0.1:{tls_port}/0?ssl_ca_certs={tls.ca}"
    else:
        url = f"redis://{user}:{PASSWORD}@127.0.0.1:{server.port}/0"
    return Node(server, url, f"redis://admin:{ADMIN_PASSWORD}@127.0.0.1:{server.port}/0")


@pytest.fixture(scope="module", params=["redis", "rediss"])
def deployment(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    tls = Tls.make(tmp_path_factory.mktemp("tls")) if request.param == "rediss" else None
    started: list[RedisServer] = []
    try:
        try:
            store = start_node(STORE_USER, tls, started)
        except EmbeddedServerError as exc:
            if tls is not None and "tls" in str(exc).lower():
                pytest.skip(f"this redis-server has no TLS: {exc}")
            raise
        masters = [start_node(LOCK_USER, tls, started) for _ in range(3)]
        yield Deployment(store, masters)
    finally:
        for server in started:
            server.close()


@pytest.fixture
async def admins(deployment: Deployment) -> AsyncIterator[list[Redis]]:
    """Admin clients of every node (store first), after a flush and an ACL LOG RESET."""
    clients = [Redis.from_url(node.admin_url) for node in deployment.nodes]
    for client in clients:
        await client.flushall()
        await client.execute_command("ACL", "LOG", "RESET")
    yield clients
    for client in clients:
        await client.aclose()


async def denials(admins: Sequence[Redis]) -> list[Any]:
    """Every ACL LOG entry of every node: what a restricted user tried and was refused.

    Except CLIENT SETINFO (Redis 7.2+): redis-py ignores its refusal, and the rules leave it
    out because Redis 7.0 rejects the rule word.
    """
    entries = [entry for client in admins for entry in await client.acl_log()]
    return [entry for entry in entries if entry.get("object") != "client|setinfo"]


class Loader:
    def __init__(self, value: float = DB_VALUE) -> None:
        self.value = value
        self.calls = 0

    async def __call__(self) -> float:
        self.calls += 1
        await asyncio.sleep(0.05)  # callers on every pod overlap the rebuild
        return self.value


def total(coordinators: Sequence[ReseedCoordinator], field: str) -> int:
    return sum(getattr(c.stats, field) for c in coordinators)


# -- the library as the restricted users ------------------------------------------------


async def test_get_increment_and_reset_as_the_restricted_users(
    deployment: Deployment, admins: list[Redis]
) -> None:
    coordinators = [deployment.coordinator(lease=1.0) for _ in range(3)]
    try:
        load = Loader()
        values = await asyncio.gather(*(c.get(KEY, load) for c in coordinators for _ in range(3)))
        assert values == [DB_VALUE] * 9
        assert load.calls == 1
        # Under a lease on the masters: a refused lock command would have degraded the lock.
        assert total(coordinators, "lock_degraded") == 0
        assert total(coordinators, "leases_won") >= 1
        assert total(coordinators, "seeds_won") == 1
        assert await coordinators[1].increment(KEY, 5) == DB_VALUE + 5
        await coordinators[2].reset(KEY)
        assert await admins[0].get(KEY) is None
        # A rebuild held until its lease was extended (the masters' extend script).
        gate = asyncio.Event()

        async def held() -> float:
            await gate.wait()
            return 7.0

        rebuild = asyncio.create_task(coordinators[0].increment(KEY, 1, loader=held))
        async with asyncio.timeout(10):
            while not coordinators[0].stats.lease_extensions:  # noqa: ASYNC110 (a counter)
                await asyncio.sleep(0.01)
        gate.set()
        assert await rebuild == 8.0
        assert total(coordinators, "store_errors") == 0
    finally:
        for coordinator in coordinators:
            await coordinator.aclose()
    assert await denials(admins) == []


async def test_budget_guard_check_and_record_as_the_restricted_users(
    deployment: Deployment, admins: list[Redis], source: PostgresSpendSource
) -> None:
    await source.set_budget("team", "t", 100.0)
    await source.pool.execute("UPDATE budget_entity SET spend = 10")
    async with deployment.coordinator() as coordinator:
        guard = BudgetGuard(coordinator, source, write_mode="ledger")
        assert await guard.check([("team", "t", 100.0)]) == [10.0]
        await guard.record("r1", [("team", "t")], 5.0)
        assert (await guard.record("r1", [("team", "t")], 5.0)).duplicate
        assert await guard.check([("team", "t", 100.0), ("key", "k", None)]) == [15.0, None]
        assert float(await admins[0].get(guard.key("team", "t"))) == 15.0
        assert guard.stats.duplicates == 1
    assert await denials(admins) == []


async def test_the_users_can_do_nothing_outside_their_rules(deployment: Deployment) -> None:
    store = Redis.from_url(deployment.store.url)
    master = Redis.from_url(deployment.masters[0].url)
    try:
        refused = [
            store.flushall(),
            store.get("other:key"),
            store.set("other:key", 1),
            store.keys("*"),
            store.config_get("requirepass"),
            store.publish("other:channel", "x"),
            master.flushall(),
            master.set(KEY, 1),  # a counter key: the masters' user only has lease keys
            master.get("redlock:other"),
        ]
        for call in refused:
            with pytest.raises(NoPermissionError):
                await call
        assert await store.get(KEY) is None  # in the rule: allowed
    finally:
        await store.aclose()
        await master.aclose()


async def test_a_key_outside_the_rule_is_a_typed_store_error(
    deployment: Deployment, admins: list[Redis]
) -> None:
    async with deployment.coordinator() as coordinator:
        load = Loader()
        with pytest.raises(StoreError) as caught:
            await coordinator.get("other:spend:team:t1", load)
    assert load.calls == 0
    assert_no_secret(caught.value)


# -- credentials never show -------------------------------------------------------------


def texts_of(exc: BaseException) -> list[str]:
    """str and repr of an exception and of every exception in its cause/context chain."""
    texts: list[str] = []
    seen: BaseException | None = exc
    while seen is not None:
        texts += [str(seen), repr(seen)]
        seen = seen.__cause__ or seen.__context__
    return texts


def assert_no_secret(*found: BaseException | str) -> None:
    for item in found:
        texts = texts_of(item) if isinstance(item, BaseException) else [item]
        for text in texts:
            for secret in SECRETS:
                assert secret not in text, text


def with_password(url: str, password: str) -> str:
    return url.replace(PASSWORD, password)


async def test_no_credentials_in_errors_logs_or_metrics(
    deployment: Deployment, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    registry = CollectorRegistry()
    observer = PrometheusObserver(registry)
    failures: list[BaseException] = []

    async def failing(coordinator: ReseedCoordinator) -> None:
        try:
            with pytest.raises(StoreError) as caught:
                await coordinator.get(KEY, Loader())
            failures.append(caught.value)
        finally:
            await coordinator.aclose()

    # A wrong password on the store, then on the lock masters (the lock degrades: logged).
    wrong = ReseedCoordinator.from_urls(
        with_password(deployment.store.url, WRONG_PASSWORD),
        lock_urls=[m.url for m in deployment.masters],
        observer=observer,
        **TIMEOUTS,
    )
    await failing(wrong)
    async with ReseedCoordinator.from_urls(
        deployment.store.url,
        lock_urls=[with_password(m.url, WRONG_PASSWORD) for m in deployment.masters],
        observer=observer,
        **TIMEOUTS,
    ) as degraded:
        assert await degraded.get(KEY, Loader()) == DB_VALUE
        assert degraded.stats.lock_degraded >= 1
    # A store that is down.
    down = RedisServer(extra_args=user_config(STORE_USER))
    down.start()
    url = f"redis://{STORE_USER}:{PASSWORD}@127.0.0.1:{down.port}/0"
    down.close()
    await failing(ReseedCoordinator.from_urls(url, lock_urls=[url], observer=observer))

    assert len(failures) == 2
    assert_no_secret(*failures)
    assert any("degraded" in str(r.__dict__.get("outcome")) for r in caplog.records)
    for record in caplog.records:
        assert_no_secret(record.getMessage(), repr(record.__dict__))
        if record.exc_info and record.exc_info[1] is not None:
            assert_no_secret(record.exc_info[1])
    assert_no_secret(caplog.text, generate_latest(registry).decode())


def test_no_credentials_in_the_commands_output(
    servers: EmbeddedServers, capsys: pytest.CaptureFixture[str]
) -> None:
    # The session's servers have no such user: the store refuses the AUTH. Plain redis://
    # only: redaction does not depend on the transport.
    assert servers.postgres is not None
    store, *masters = (
        f"redis://{STORE_USER}:{password}@127.0.0.1:{server.port}/0"
        for server, password in zip(servers.redis, (*SECRETS, PASSWORD), strict=True)
    )
    locks = [arg for url in masters for arg in ("--lock-url", url)]
    pg = ["--pg-dsn", servers.postgres.dsn]
    for argv in (
        ["race", "--json", "--redis-url", store, *locks, *pg],
        ["doctor", "--json", "--redis-url", store, *pg],
    ):
        assert main(argv) == 2
        out, err = capsys.readouterr()
        assert "***" in err  # the URL is shown, its password redacted
        assert_no_secret(out, err)
