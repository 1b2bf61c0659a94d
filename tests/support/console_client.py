"""A small HTTP client for the console's tests: real requests to a real server, cookies kept by hand.

Python's cookie jar keeps Secure cookies off plain HTTP even on localhost (browsers send them there), so
this client stores the cookies itself and shows the tests every Set-Cookie attribute.
"""

from __future__ import annotations

import http.client
import re
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from urllib.parse import urlencode, urlsplit


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    set_cookies: list[str]
    body: str

    @property
    def location(self) -> str:
        return self.headers.get("location", "")


@dataclass
class ConsoleClient:
    base: str  # e.g. http://localhost:8080
    cookies: dict[str, str] = field(default_factory=dict)

    def request(
        self,
        method: str,
        path: str,
        form: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        u = urlsplit(self.base)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        hdrs = {"Host": u.netloc, **(headers or {})}
        if self.cookies:
            hdrs["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        body = None
        if form is not None:
            body = urlencode(form).encode()
            hdrs["Content-Type"] = "application/x-www-form-urlencoded"
        conn.request(method, path, body=body, headers=hdrs)
        r = conn.getresponse()
        text = r.read().decode("utf-8", "replace")
        set_cookies = r.headers.get_all("set-cookie") or []
        for raw in set_cookies:
            c = SimpleCookie()
            c.load(raw)
            for name, morsel in c.items():
                if morsel["max-age"] == "0" or "expires=Thu, 01 Jan 1970" in raw:
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = morsel.value
        conn.close()
        return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, set_cookies, text)

    def get(self, path: str, **kw: object) -> Reply:
        return self.request("GET", path, **kw)  # type: ignore[arg-type]

    def post(self, path: str, form: dict[str, str], **kw: object) -> Reply:
        return self.request("POST", path, form=form, **kw)  # type: ignore[arg-type]

    def login(self, user: str, password: str) -> Reply:
        page = self.get("/login")
        token = re.search(r'name="login_token" value="([^"]+)"', page.body)
        assert token, page.body[:500]
        return self.post(
            "/login",
            {"login_token": token.group(1), "username": user, "password": password, "next": "/fleet"},
        )

    def csrf(self, path: str = "/fleet") -> str:
        m = re.search(r'name="csrf" value="([^"]+)"', self.get(path).body)
        assert m, "no CSRF token on the page: not signed in?"
        return m.group(1)
