"""Who may use the web UI and how each request is checked.

* Listening beyond loopback (`--host`, `--share`) needs a login (`--auth user:password` or
  `--auth-file`), else RUNTIME_UI_AUTH_NOT_ENFORCED.
* Passwords are kept only as scrypt hashes (stdlib `hashlib.scrypt`, random salt) and
  compared in constant time; failed logins are rate limited per client and per user.
* The session is Starlette's signed cookie (itsdangerous), HttpOnly and SameSite=Strict.
* Every state-changing request carries the session's CSRF token and an Origin that is
  this server; every response carries the security headers below.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from backpropagate.errors import ConfigError, RunFailedError

# scrypt cost (RFC 7914's interactive-login parameters: ~16 MiB, tens of ms).
_SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}
LOGIN_ATTEMPTS = 5  # failed logins allowed per window, per client address and per user name
LOGIN_WINDOW_S = 60.0
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "frame-ancestors 'none'; form-action 'self'; base-uri 'none'; object-src 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
    "Cache-Control": "no-store",
}


@dataclass(frozen=True)
class Credential:
    """One user: the name and the scrypt hash of the password (never the password)."""

    user: str
    salt: bytes
    digest: bytes

    @classmethod
    def create(cls, user: str, password: str) -> Credential:
        """Hashes `password` with a fresh salt."""
        salt = secrets.token_bytes(16)
        return cls(user, salt, _scrypt(password, salt))

    def matches(self, user: str, password: str) -> bool:
        """Whether `user` / `password` are this credential's (constant time in the password)."""
        same_user = hmac.compare_digest(user.encode(), self.user.encode())
        return hmac.compare_digest(_scrypt(password, self.salt), self.digest) and same_user


def _scrypt(password: str, salt: bytes) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, **_SCRYPT)


def parse_auth(spec: str, source: str = "--auth") -> Credential:
    """`user:password` -> a hashed credential; a malformed spec is refused without echoing it."""
    user, sep, password = spec.strip().partition(":")
    if not sep or not user or not password:
        raise ConfigError("CONFIG_INVALID_SETTING", f"{source} is invalid: expected user:password (both non-empty)")
    return Credential.create(user, password)


def read_auth_file(path: Path) -> Credential:
    """The `user:password` on the first line of `path` (kept out of the shell history and `ps`)."""
    try:
        first = path.read_text(encoding="utf-8").splitlines()[:1]
    except OSError as exc:
        raise ConfigError(
            "CONFIG_INVALID_SETTING", f"--auth-file={str(path)!r} cannot be read ({exc.strerror or exc})"
        ) from exc
    return parse_auth(first[0] if first else "", f"--auth-file={str(path)!r}")


def is_loopback(host: str) -> bool:
    """Whether `host` is only reachable from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, share: bool, credential: Credential | None) -> None:
    """Refuses to listen beyond loopback without a login.

    Raises:
        RunFailedError: RUNTIME_UI_AUTH_NOT_ENFORCED.
    """
    if credential is None and (share or not is_loopback(host)):
        where = "--share" if share else f"--host {host}"
        raise RunFailedError(
            "RUNTIME_UI_AUTH_NOT_ENFORCED", f"{where} would let other machines in without a login; refused"
        )


class LoginLimiter:
    """Sliding-window count of failed logins per key (client address, user name)."""

    def __init__(self, attempts: int = LOGIN_ATTEMPTS, window_s: float = LOGIN_WINDOW_S) -> None:
        self.attempts = attempts
        self.window_s = window_s
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> deque[float]:
        times = self._failures.setdefault(key, deque())
        while times and now - times[0] > self.window_s:
            times.popleft()
        return times

    def blocked(self, *keys: str) -> float:
        """Seconds until any of `keys` may try again (0 = may try now)."""
        now = time.monotonic()
        with self._lock:
            waits = [
                self.window_s - (now - t[0]) for t in (self._recent(k, now) for k in keys) if len(t) >= self.attempts
            ]
        return max(waits, default=0.0)

    def failed(self, *keys: str) -> None:
        """Counts one failed login against each key."""
        now = time.monotonic()
        with self._lock:
            for key in keys:
                self._recent(key, now).append(now)


def new_csrf_token() -> str:
    """A random per-session token that forms and scripts send back."""
    return secrets.token_urlsafe(32)


def same_token(given: str | None, expected: str | None) -> bool:
    """Constant-time comparison of a CSRF token with the session's."""
    return bool(given and expected) and hmac.compare_digest(str(given), str(expected))


def same_origin(origin: str | None, referer: str | None, scheme: str, host: str | None) -> bool:
    """Whether the request's Origin (or, lacking it, Referer) is this server itself."""
    if not host:
        return False
    expected = f"{scheme}://{host}"
    if origin:
        return origin == expected
    return bool(referer) and (referer == expected or referer.startswith(expected + "/"))  # type: ignore[union-attr]
