"""The login and logout pages: templates and static files shipped in the package.

Templates are ``string.Template`` files; every value put into them is HTML-escaped here, except
the form fragments this module renders itself. The pages load one stylesheet and one script,
both from ``/guard/static/`` (the CSP allows nothing else), named with a digest of their content
so they can be cached for a year.
"""

from __future__ import annotations

import hashlib
import html
from dataclasses import dataclass
from functools import cache
from importlib import resources
from string import Template
from typing import Final
from urllib.parse import quote

STATIC_PREFIX: Final = "/guard/static/"
CONTENT_TYPES: Final = {
    "login.css": b"text/css; charset=utf-8",
    "login.js": b"text/javascript; charset=utf-8",
}
SSO_LOGIN_PATH: Final = "/guard/oidc/login"
# The pages' own policy; SecurityHeadersMiddleware adds the gateway's frame-ancestors.
PAGE_CSP: Final = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    b"form-action 'self'; base-uri 'none'"
)


def _read(name: str) -> str:
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


@cache
def template(name: str) -> Template:
    return Template(_read(name))


@cache
def static_file(name: str) -> bytes | None:
    """A static file's bytes, or None if there is no such file."""
    if name not in CONTENT_TYPES:
        return None
    return _read(name).encode("utf-8")


@cache
def version(name: str) -> str:
    data = static_file(name) or b""
    return hashlib.sha256(data).hexdigest()[:12]


def _e(value: str) -> str:
    return html.escape(value, quote=True)


@dataclass(frozen=True, slots=True)
class LoginForm:
    """What one rendering of the login page shows."""

    csrf_token: str
    next: str
    directory: bool  # LDAP is configured: the directory form comes first
    error: str = ""
    username: str = ""  # typed into the form that failed, shown again (never the password)
    token_failed: bool = False  # the token form failed: open it and fill its name
    sso: bool = False  # OpenID Connect is configured: the single sign-on button


def render_login(form: LoginForm) -> bytes:
    common = {"csrf_token": _e(form.csrf_token), "next": _e(form.next)}
    directory = ""
    if form.directory:
        username = "" if form.token_failed else form.username
        directory = template("directory-form.html").substitute(common, username=_e(username))
    token_name = form.username if form.token_failed or not form.directory else ""
    if form.directory or form.sso:  # the token form is the fallback, folded away
        wrapper = {
            "wrapper": "details",
            "open": " open" if form.token_failed else "",
            "summary": "<summary>Log in with a gateway token</summary>",
            "autofocus": "",
        }
    else:
        wrapper = {"wrapper": "section", "open": "", "summary": "", "autofocus": " autofocus"}
    token = template("token-form.html").substitute(common, token_name=_e(token_name), **wrapper)
    page = template("login.html").substitute(
        css_version=version("login.css"),
        js_version=version("login.js"),
        error=_e(form.error),
        directory_form=directory,
        sso=template("sso-button.html").substitute(
            sso_href=_e(SSO_LOGIN_PATH + "?next=" + quote(form.next, safe="")),
            next=_e(form.next),
        )
        if form.sso
        else "",
        token_form=token,
    )
    return page.encode("utf-8")


def render_logout(name: str, csrf_token: str) -> bytes:
    page = template("logout.html").substitute(
        css_version=version("login.css"), name=_e(name), csrf_token=_e(csrf_token)
    )
    return page.encode("utf-8")


def render_sso_error(title: str, message: str, retry: str) -> bytes:
    """The page of a single sign-on that did not log in: what happened and a link to retry."""
    page = template("sso-error.html").substitute(
        css_version=version("login.css"), title=_e(title), message=_e(message), retry=_e(retry)
    )
    return page.encode("utf-8")
