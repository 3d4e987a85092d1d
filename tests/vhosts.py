"""A RabbitMQ vhost of its own for each test session or benchmark run.

Tests bind `#` on accounts_in and apply whatever arrives, so two test nodes on
one broker (two pytest runs, CI beside a developer) must never share a vhost.
AMQP cannot create vhosts: the broker's management HTTP API does it when it
answers, otherwise `rabbitmqctl` on the broker's machine.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any, Protocol

MANAGEMENT_PORT = 15672
MANAGEMENT_TIMEOUT_SECONDS = 5.0
RABBITMQCTL_TIMEOUT_SECONDS = 60.0
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
# pika's defaults when the URL names no user or vhost.
DEFAULT_USER = "guest"
DEFAULT_PASSWORD = "guest"
DEFAULT_VHOST = "/"
EVERYTHING = ".*"
MANAGEMENT_URL_VARIABLE = "PYSWPT_TEST_RABBITMQ_MANAGEMENT_URL"


class VhostAdminError(RuntimeError):
    """The broker would not create, grant or delete a vhost, or nothing can ask it to."""


class VhostAdmin(Protocol):
    def create_vhost(self, vhost: str) -> None: ...

    def grant_everything(self, vhost: str, user: str) -> None: ...

    def delete_vhost(self, vhost: str) -> None: ...

    def vhost_exists(self, vhost: str) -> bool: ...


# --- URLs ---------------------------------------------------------------------


def url_with_vhost(url: str, vhost: str) -> str:
    """The same AMQP URL, naming another vhost (percent-encoded, so `/` is `%2F`)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + urllib.parse.quote(vhost, safe="")))


def vhost_of(url: str) -> str:
    """The vhost an AMQP URL names, as pika reads it: `/` when the path is empty."""
    path = urllib.parse.urlsplit(url).path
    return urllib.parse.unquote(path[1:]) if len(path) > 1 else DEFAULT_VHOST


def credentials_of(url: str) -> tuple[str, str]:
    parts = urllib.parse.urlsplit(url)
    user = urllib.parse.unquote(parts.username) if parts.username else DEFAULT_USER
    password = urllib.parse.unquote(parts.password) if parts.password is not None else DEFAULT_PASSWORD
    return user, password


def default_management_url(amqp_url: str) -> str:
    host = urllib.parse.urlsplit(amqp_url).hostname or "localhost"
    if ":" in host:  # an IPv6 address goes in brackets
        host = f"[{host}]"
    return f"http://{host}:{MANAGEMENT_PORT}"


# --- the management HTTP API ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ManagementApi:
    base_url: str  # without credentials, so that it can be shown in errors
    user: str
    password: str

    @classmethod
    def at(cls, management_url: str, amqp_url: str) -> ManagementApi:
        """The API at `management_url`, with its own credentials or else the AMQP URL's."""
        parts = urllib.parse.urlsplit(management_url)
        user, password = credentials_of(management_url if parts.username else amqp_url)
        netloc = parts.netloc.rsplit("@", 1)[-1]
        return cls(urllib.parse.urlunsplit(parts._replace(netloc=netloc)).rstrip("/"), user, password)

    def answers(self) -> bool:
        """True when an HTTP server answers there (even with an error status)."""
        try:
            self._call("GET", "/api/overview")
        except urllib.error.HTTPError:
            return True
        except (OSError, ValueError):
            return False
        return True

    def create_vhost(self, vhost: str) -> None:
        self._change("PUT", f"/api/vhosts/{quoted(vhost)}", {})

    def grant_everything(self, vhost: str, user: str) -> None:
        permissions = {"configure": EVERYTHING, "write": EVERYTHING, "read": EVERYTHING}
        self._change("PUT", f"/api/permissions/{quoted(vhost)}/{quoted(user)}", permissions)

    def delete_vhost(self, vhost: str) -> None:
        self._change("DELETE", f"/api/vhosts/{quoted(vhost)}")

    def vhost_exists(self, vhost: str) -> bool:
        try:
            self._call("GET", f"/api/vhosts/{quoted(vhost)}")
        except urllib.error.HTTPError as error:
            if error.code == 404:
                return False
            raise VhostAdminError(f"{self.base_url} answered {error.code} to GET vhost {vhost!r}") from error
        return True

    def _change(self, method: str, path: str, body: dict[str, Any] | None = None) -> None:
        try:
            self._call(method, path, body)
        except urllib.error.HTTPError as error:
            reason = error.read().decode(errors="replace")
            raise VhostAdminError(
                f"{self.base_url} answered {error.code} to {method} {path} as user {self.user!r}: {reason}"
            ) from error

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> None:
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        request = urllib.request.Request(
            self.base_url + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=MANAGEMENT_TIMEOUT_SECONDS):
            pass


def quoted(name: str) -> str:
    """A vhost or user name as one path segment of the management API (`/` is `%2F`)."""
    return urllib.parse.quote(name, safe="")


# --- rabbitmqctl --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rabbitmqctl:
    # Runs `rabbitmqctl <args>` where the broker is; returns the exit status and output.
    run: Callable[[list[str]], tuple[int, str]]

    def create_vhost(self, vhost: str) -> None:
        self._check(["add_vhost", vhost])

    def grant_everything(self, vhost: str, user: str) -> None:
        self._check(["set_permissions", "-p", vhost, user, EVERYTHING, EVERYTHING, EVERYTHING])

    def delete_vhost(self, vhost: str) -> None:
        self._check(["delete_vhost", vhost])

    def vhost_exists(self, vhost: str) -> bool:
        return vhost in self._check(["list_vhosts", "--silent", "name"]).splitlines()

    def _check(self, args: list[str]) -> str:
        status, output = self.run(args)
        if status != 0:
            raise VhostAdminError(
                f"`rabbitmqctl {' '.join(args)}` exited with {status} "
                f"(it must run as root or as the broker's user): {output.strip()}"
            )
        return output


def run_local_rabbitmqctl(args: list[str]) -> tuple[int, str]:
    done = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=RABBITMQCTL_TIMEOUT_SECONDS)
    return done.returncode, done.stdout + done.stderr


def rabbitmqctl_in_container(container: Any) -> Rabbitmqctl:
    """rabbitmqctl inside a testcontainers RabbitMQ container (its image has no management API)."""

    def run(args: list[str]) -> tuple[int, str]:
        result = container.exec(["rabbitmqctl", *args])
        return result.exit_code, result.output.decode(errors="replace")

    return Rabbitmqctl(run)


# --- choosing one, and a vhost for a while ---------------------------------------------


def vhost_admin_for(amqp_url: str, management_url: str | None = None) -> VhostAdmin:
    """The management API when it answers, else rabbitmqctl for a broker on this machine."""
    if management_url:
        api = ManagementApi.at(management_url, amqp_url)
        if not api.answers():
            raise VhostAdminError(
                f"the RabbitMQ management API at {api.base_url} ({MANAGEMENT_URL_VARIABLE}) does not answer"
            )
        return api
    api = ManagementApi.at(default_management_url(amqp_url), amqp_url)
    if api.answers():
        return api
    host = urllib.parse.urlsplit(amqp_url).hostname or "localhost"
    if shutil.which("rabbitmqctl") is None:
        why_not_rabbitmqctl = "rabbitmqctl is not on PATH"
    elif host not in LOOPBACK_HOSTS:
        why_not_rabbitmqctl = "the broker is not on this machine, where rabbitmqctl is"
    else:
        return Rabbitmqctl(run_local_rabbitmqctl)
    raise VhostAdminError(
        f"cannot create a RabbitMQ vhost for the tests on {host}: the management API at {api.base_url} "
        f"does not answer and {why_not_rabbitmqctl}. Enable the management plugin "
        f"(rabbitmq-plugins enable rabbitmq_management), or set {MANAGEMENT_URL_VARIABLE}="
        f"http://USER:PASSWORD@HOST:{MANAGEMENT_PORT} (an administrator), or run the tests as root "
        f"on the broker's machine with rabbitmqctl on PATH."
    )


@contextlib.contextmanager
def own_vhost(admin: VhostAdmin, server_url: str, prefix: str) -> Iterator[str]:
    """`server_url` naming a new vhost `<prefix>_<uuid>` where its user may do
    everything; the vhost and all it holds are deleted afterwards, whatever happens."""
    vhost = f"{prefix}_{uuid.uuid4().hex}"
    user, _password = credentials_of(server_url)
    admin.create_vhost(vhost)
    try:
        admin.grant_everything(vhost, user)
        yield url_with_vhost(server_url, vhost)
    finally:
        admin.delete_vhost(vhost)
