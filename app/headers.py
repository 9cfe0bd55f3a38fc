"""Security headers on every response, the session cookie's flags, and trusted proxies.

Every answer (pages, fragments, the JSON API, errors, static files, the
plain GET of ``/ws``) carries a Content-Security-Policy that allows scripts,
styles and connections from this site only, and never inline script: a
string that got into a page cannot run, and no other site can frame it. The
templates hold no inline script, event handler or ``style`` attribute for
that reason (``static/confirm.js`` asks before a delete), and htmx needs no
``eval`` as long as no template uses ``hx-on`` or a ``js:`` expression.

The session cookie is HttpOnly and SameSite=Lax always, and Secure whenever
the request came over HTTPS. Behind a proxy that terminates TLS, the app
sees plain HTTP unless it trusts the proxy's ``X-Forwarded-*`` headers:
``PROXY_FIX`` says how many proxies to trust (0, the default: none, since
anyone could send those headers). ``PREFERRED_URL_SCHEME=https`` marks the
cookie Secure whatever the request says.
"""
import functools
import re

from flask import request
from flask.sessions import SecureCookieSessionInterface
from werkzeug.middleware.proxy_fix import ProxyFix

# The policy's fixed part; connect-src is completed per request (_policy).
# 'self' matches same-host ws: and wss: in CSP Level 3 browsers; older ones
# (Safari before 15.4) need the socket's origin named, so it is.
POLICY = {
    'default-src': "'self'",
    'script-src': "'self'",
    'style-src': "'self'",
    'img-src': "'self'",
    'connect-src': "'self'",
    'object-src': "'none'",
    'base-uri': "'self'",
    'form-action': "'self'",
    'frame-ancestors': "'none'",
}

HEADERS = {
    # Within the site, links carry the whole address (filters, job ids); a
    # link to another site is followed without saying where from.
    'Referrer-Policy': 'same-origin',
    'X-Content-Type-Options': 'nosniff',
    # frame-ancestors 'none' says the same to browsers that read CSP.
    'X-Frame-Options': 'DENY',
    'Cross-Origin-Opener-Policy': 'same-origin',
    # No other site may load our answers as images, scripts or the like.
    'Cross-Origin-Resource-Policy': 'same-origin',
}

# A Host value that may go into the policy as it is: a name or IPv4 address
# and a port. Anything else (an IPv6 literal, which CSP cannot name, or a
# forged header) leaves connect-src at 'self'.
_HOST = re.compile(r'[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?')


def register(app):
    """Trust ``PROXY_FIX`` proxies, secure the session cookie, add the headers to every response."""
    hops = app.config['PROXY_FIX']
    if hops:
        # Each of the hops appends to X-Forwarded-For and sets the other
        # X-Forwarded-* headers; values beyond the trusted ones are ignored.
        # app.wsgi_app, not app: gunicorn hooks are given the Flask app.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops,
                                x_port=hops, x_prefix=hops)
    app.config['SESSION_COOKIE_HTTPONLY'] = True
    app.config['SESSION_COOKIE_SAMESITE'] = 'Lax'
    app.session_interface = SessionInterface()
    app.after_request(add_headers)


class SessionInterface(SecureCookieSessionInterface):
    """Flask's signed-cookie sessions, the cookie Secure whenever the site is served over HTTPS."""

    def get_cookie_secure(self, app):
        return (super().get_cookie_secure(app) or request.is_secure
                or app.config['PREFERRED_URL_SCHEME'] == 'https')


def policy(host=None, secure=False):
    """The Content-Security-Policy header's value for a page served from ``host``.

    ``host`` is the request's ``Host`` (``name[:port]``); when it is one a
    policy can name, connect-src names the live socket's origin too, ``wss:``
    when ``secure`` else ``ws:`` (which CSP lets upgrade to ``wss:``).
    """
    directives = dict(POLICY)
    if host and _HOST.fullmatch(host):
        directives['connect-src'] += f" {'wss' if secure else 'ws'}://{host}"
    return '; '.join(f'{name} {value}' for name, value in directives.items())


@functools.lru_cache(maxsize=64)
def _policy(host, secure):
    # A process serves a few hosts (its name, its address, a proxy's): each
    # policy is made once, not on every response.
    return policy(host, secure)


def add_headers(response):
    """Add the policy and the other security headers, unless the view set its own."""
    headers = response.headers
    present = {name.lower() for name in headers.keys()}
    missing = [(name, value) for name, value in HEADERS.items() if name.lower() not in present]
    if 'content-security-policy' not in present:
        missing.append(('Content-Security-Policy', _policy(request.host, request.is_secure)))
    headers.extend(missing)
    return response
