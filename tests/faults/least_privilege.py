"""Least-privilege users for the fault suite (issue 19 item 3; RELIABILITY.md S3, S5).

- :func:`redis_acl_rules`: the Redis ACL of a taskloom user: its namespace's keys
  (``~<ns>:*``) and pub/sub channels (``&<ns>:*``) only, and only the commands
  taskloom sends (:data:`REDIS_COMMANDS`, measured with ``INFO commandstats``
  over the contract suite and a worker with results and ops, and checked against
  every ``redis.call`` of the Lua scripts). Everything else is denied:
  ``FLUSHALL``, ``FLUSHDB``, ``CONFIG``, ``KEYS``, ``DEBUG``, ``SHUTDOWN``,
  ``SCRIPT FLUSH``/``KILL``, ``FUNCTION``, ``MONITOR``, ``ACL`` ...
- :func:`rabbit_permissions`: configure/write/read regexes limited to the
  namespace's queues and exchanges (plus write on ``amq.default``, the default
  exchange taskloom publishes through).
- :class:`RabbitVhostUser`: a vhost and a user created with ``rabbitmqctl`` on the
  shared RabbitMQ node, and deleted again on exit (nothing else on that node is
  touched).

Why ``EVAL`` stays allowed (S3 wishes it denied): every multi-key step of taskloom
(publish, fetch, settle, reclaim, result compare-and-set, joins, claims, ops
transitions) is a Lua script run with ``EVALSHA`` after ``SCRIPT LOAD``, and
``SCRIPT LOAD`` + ``EVALSHA`` can run any script ``EVAL`` can: denying ``EVAL``
alone buys nothing, and redis-py's ``register_script`` (rate limits) falls back
to ``EVAL`` on ``NOSCRIPT``. Key patterns still apply inside scripts: a script
cannot touch a key or channel outside ``~<ns>:*`` / ``&<ns>:*``.
"""

from __future__ import annotations

import re
import secrets
import subprocess
from types import TracebackType
from typing import Final, Self
from urllib.parse import quote

import redis

__all__ = [
    "DENIED_COMMANDS",
    "REDIS_COMMANDS",
    "RabbitVhostUser",
    "acl_denials",
    "rabbit_permissions",
    "redis_acl_rules",
]

#: Every command taskloom sends to Redis (broker, result store, ops, limits).
REDIS_COMMANDS: Final = (
    # connection (redis-py's handshake; SELECT for a /N database). Redis >= 7.2 only:
    # redis-py also sends CLIENT SETINFO, and ignores its refusal
    "auth", "hello", "ping", "select",
    # scripts (see the module docstring for EVAL)
    "evalsha", "eval", "script|load", "multi", "exec", "discard",
    # strings and keys
    "get", "mget", "getrange", "set", "incr", "exists", "del", "unlink", "pexpire",
    "scan", "time",
    # hashes
    "hget", "hgetall", "hmget", "hset", "hsetnx", "hdel", "hexists", "hincrby", "hlen",
    "hkeys",
    # sets
    "sadd", "srem", "smembers",
    # sorted sets
    "zadd", "zcard", "zcount", "zrange", "zrangebyscore", "zrevrangebyscore", "zrem",
    "zremrangebyscore", "zscore",
    # streams
    "xack", "xadd", "xautoclaim", "xclaim", "xdel", "xgroup|create", "xgroup|delconsumer",
    "xinfo|groups", "xinfo|consumers", "xlen", "xpending", "xrange", "xread", "xreadgroup",
    "xrevrange", "xtrim",
    # pub/sub (completion, update and revocation channels)
    "publish", "subscribe", "unsubscribe",
)

#: Commands a taskloom user must not have (the test checks each is refused).
DENIED_COMMANDS: Final = (
    ("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "SET", "appendonly", "no"),
    ("CONFIG", "GET", "maxmemory-policy"), ("KEYS", "*"), ("DEBUG", "SLEEP", "0"),
    ("SCRIPT", "FLUSH"), ("ACL", "LIST"), ("SHUTDOWN", "NOSAVE"),
)


def redis_acl_rules(namespace: str, password: str) -> list[str]:
    """The ``ACL SETUSER <user>`` rules of a taskloom user of ``namespace``
    (a glob: ``?`` and ``*`` allowed, as in ``t??????????`` for the test ids)."""
    return ["reset", "on", f">{password}", f"~{namespace}:*", f"&{namespace}:*", "-@all",
            *(f"+{c}" for c in REDIS_COMMANDS)]


def acl_denials(client: redis.Redis) -> list[tuple[str, str, str]]:
    """(user, reason, object) of each entry of ``ACL LOG`` (as an admin)."""
    out = []
    for entry in client.acl_log(count=1000):
        out.append((str(entry["username"]), str(entry["reason"]), str(entry["object"])))
    return out


def rabbit_permissions(namespace_regex: str) -> tuple[str, str, str]:
    """configure, write, read regexes for a taskloom user of a namespace.

    Every queue and exchange taskloom declares is ``<ns>.<...>`` (brokers/amqp/
    topology.py); it publishes through the default exchange, whose name in
    permission checks is ``amq.default``.
    """
    own = f"^{namespace_regex}\\."
    return own, f"^({namespace_regex}\\.|amq\\.default$)", own


class RabbitVhostUser:
    """A vhost and a user of it on a RabbitMQ node, deleted on exit.

    ``rabbitmqctl`` against the shared node: creating and deleting our own vhost
    and user is not destructive to it. The names carry a random suffix.
    """

    def __init__(self, *, vhosts: int = 1, permissions: tuple[str, str, str],
                 host: str = "127.0.0.1", port: int = 5672, ctl: str = "rabbitmqctl") -> None:
        tag = secrets.token_hex(4)
        self.vhosts = [f"taskloom-lp-{tag}-{i}" for i in range(vhosts)]
        self.user = f"taskloom-lp-{tag}"
        self.password = secrets.token_hex(12)
        self.permissions = permissions
        self.host, self.port, self.ctl_bin = host, port, ctl

    def url(self, vhost: int = 0) -> str:
        return (f"amqp://{self.user}:{self.password}@{self.host}:{self.port}/"
                f"{quote(self.vhosts[vhost], safe='')}")

    def ctl(self, *args: str) -> str:
        done = subprocess.run([self.ctl_bin, "-q", *args], capture_output=True, timeout=60,
                              check=False)
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed ({done.returncode}): "
                               f"{done.stderr.decode(errors='replace').strip()}")
        return done.stdout.decode(errors="replace")

    def set_permissions(self, configure: str, write: str, read: str) -> None:
        for vhost in self.vhosts:
            self.ctl("set_permissions", "-p", vhost, self.user, configure, write, read)

    def __enter__(self) -> Self:
        try:
            self.ctl("add_user", self.user, self.password)
            for vhost in self.vhosts:
                self.ctl("add_vhost", vhost)
            self.set_permissions(*self.permissions)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Delete our user and vhosts (those that exist), never anything else."""
        errors = []
        for args in [("delete_user", self.user), *(("delete_vhost", v) for v in self.vhosts)]:
            try:
                self.ctl(*args)
            except RuntimeError as e:
                if not re.search(r"(no_such_user|no_such_vhost|not exist|not found)", str(e)):
                    errors.append(str(e))
        if errors:
            raise RuntimeError("; ".join(errors))

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
