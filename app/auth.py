"""Who is asking, whether they may, and whether the request really comes from our own pages.

Every request passes :func:`check_request` before its view:

1. **Who.** A bearer token (``Authorization: Bearer <token>``, for
   programs), else the session of a logged-in user (Flask-Login), else
   nobody. With no login required (:func:`login_required`) nobody is the
   local user, who may do everything: ``make run`` needs no set-up.
2. **From where.** A state-changing request (and a WebSocket handshake)
   made with a session must come from this site's own pages: the browser's
   ``Sec-Fetch-Site`` must say ``same-origin``, or failing that its
   ``Origin`` must name this host (Sidekiq 8.1's approach); a browser that
   sends neither but holds a session cookie must send the form's
   synchronizer token (Flask-WTF). A request with a bearer token, or with
   no cookie at all (curl), has nothing ambient to abuse and needs none of
   this.
3. **May they.** Each view declares its action (:func:`action`); a read is
   ``view``; a state-changing view that declares nothing is refused, so a
   new route cannot be left open by accident. The action's lowest role is in
   :mod:`app.roles`.

Refusals: 401 (API: JSON with ``WWW-Authenticate: Bearer``; pages: a
redirect to the login page), 403 with the reason, and for a WebSocket a
close with 1008 and the reason, which the page shows.
"""
import datetime as dt
import hmac
import ipaddress
import logging
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from flask import (Blueprint, current_app, g, jsonify, redirect, render_template, request,
                   session, url_for)
from flask_login import current_user, login_user, logout_user
from flask_wtf.csrf import CSRFError, generate_csrf
from markupsafe import Markup, escape

from . import accounts, audit, catalog, errors, fragments, live, roles
from .extensions import csrf, db, login_manager
from .models import Job

UNSAFE_METHODS = frozenset({'POST', 'PUT', 'PATCH', 'DELETE'})

logger = logging.getLogger(__name__)

bp = Blueprint('auth', __name__)


@dataclass(frozen=True)
class Principal:
    """Who a request acts as: a user's ``name`` (None for the local user), ``role``, ``via``
    (``'session'``, ``'token'`` or ``'local'``)."""
    name: str | None
    role: str
    via: str


LOCAL = Principal(None, 'admin', 'local')


@dataclass(frozen=True)
class Credential:
    """What a live socket was let in with, checked again while it stays open (:mod:`app.live`).

    ``kind`` is ``'session'`` (``key``: the session's user id
    ``"<id>:<epoch>"``, ``seen``: its last use, epoch seconds),
    ``'token'`` (``key``: the token) or ``'local'`` (the login-free mode);
    ``user`` is the user's name (``''`` for the local user).
    """
    kind: str
    user: str
    key: str | None = None
    seen: float = 0.0
    idle_timeout: float = 0.0

    def ended(self):
        """Why the socket may no longer stay open (a sentence), or None; in an app context."""
        if self.kind == 'session':
            if time.time() - self.seen > self.idle_timeout:
                return 'your session expired: log in again'
            if accounts.load_session_user(self.key) is None:
                return live.SESSION_ENDED
        elif self.kind == 'token':
            if accounts.token_user(self.key) is None:
                return 'your token was revoked'
        elif accounts.any_user():  # the login-free mode ended with the first user
            return live.SESSION_ENDED
        return None


def action(name):
    """Declare the action a view takes (a key of :data:`app.roles.ACTIONS`).

    ``name`` may be a function of no arguments that returns the action for
    the request at hand (a bulk action's ``delete`` needs more than its
    ``retry``).
    """
    if not callable(name):
        roles.ACTIONS[name]  # KeyError for an action nobody declared
    def mark(view):
        view.qm_action = name
        return view
    return mark


def public(view):
    """Declare a view open to anyone (the login page, /healthz, static files)."""
    view.qm_public = True
    return view


def scrape_token(key):
    """Declare that the view also admits the token set in configuration ``key``.

    ``Authorization: Bearer <token>`` with that token (compared in constant
    time) acts as a viewer on this view only: what a scraper such as
    Prometheus sends (its ``authorization`` setting). Unset, only the usual
    credentials are admitted.
    """
    def mark(view):
        view.qm_scrape_token = key
        return view
    return mark


SCRAPER = Principal('scraper', 'viewer', 'scrape-token')


def principal():
    """The :class:`Principal` of this request (None: nobody, as on the login page).

    A live render (:mod:`app.live`) has no user of its own: it acts for the
    role of the sockets it serves, which its request carries.
    """
    if 'principal' not in g:
        # Not decided yet (an answer made before check_request ran, such as
        # a 400 for bad input): decided now the same way, for display only.
        if request.environ.get(live.ROLE_KEY) in roles.ROLES:
            g.principal = Principal(None, request.environ[live.ROLE_KEY], 'socket')
        else:
            who, _refusal = _who()
            g.principal = who if who is not None or login_required() else LOCAL
    return g.principal


def can(what, task=None):
    """Whether this request's principal may take action ``what`` (templates hide what it may not).

    With ``task`` (a task type's name), the action on a job of that task:
    submitting, retrying, running now or triggering an admin-only task needs
    an admin.
    """
    who = principal()
    if who is None:
        return False
    what = what.replace('_', '-')  # the states' and the URLs' spellings of run-now
    task_type = catalog.TASKS.get(task) if task else None
    if (task_type is not None and task_type.role == 'admin'
            and what in ('submit', 'retry', 'run-now', 'trigger')):
        what = 'admin-task'
    return roles.may(who.role, what)


def out_of_reach(action):
    """Task types whose jobs this request's principal may not take bulk ``action`` on.

    Retrying a job runs it again: an admin-only task's jobs (``purge``) are
    spared unless the principal may run admin-only tasks.
    """
    if action != 'retry' or can('admin-task'):
        return ()
    return tuple(name for name, task_type in catalog.TASKS.items() if task_type.role == 'admin')


def refusal(what):
    """Why this request's principal may not take action ``what`` (a sentence, for pages)."""
    who = principal()
    return roles.refusal(who.role if who else None, what)


def csrf_field():
    """The form's hidden synchronizer-token field (empty in a live render, which has no session)."""
    who = principal()
    if who is not None and who.via == 'socket':
        return Markup('')
    return Markup(f'<input type="hidden" name="csrf_token" value="{escape(generate_csrf())}">')


def login_required():
    """Whether this request needs a logged-in user (or a token).

    Always with ``AUTH=login``, in the distributed mode, when the server is
    configured to listen on anything but a loopback address, or for a
    request that does not come from this machine: from another address, for
    a host name that is not a loopback one (a page on another site that
    rebound its DNS name to 127.0.0.1 sends its own name), or through an
    undeclared proxy (``X-Forwarded-*`` with ``PROXY_FIX=0``); otherwise
    (``make run``) only once a user exists.
    """
    config = current_app.config
    if (config['AUTH'] == 'login' or not config['EMBEDDED'] or not _loopback(config['HOST'])
            or not _loopback(request.remote_addr) or not _loopback(_host_name())
            or (not config['PROXY_FIX'] and _forwarded())):
        return True
    return accounts.any_user()


def _host_name():
    try:
        return urlsplit('//' + request.host).hostname
    except ValueError:
        return None


def _forwarded():
    # Sent through a proxy or tunnel on this machine (nginx, ssh -R, a
    # port forwarder) that nobody declared (PROXY_FIX=0): from elsewhere.
    return any(key.startswith(_PROXY_HEADERS) for key in request.environ)


# What proxies and tunnels commonly add (X-Forwarded-*, Forwarded, X-Real-IP,
# Via, and the client-address headers of some load balancers and CDNs).
_PROXY_HEADERS = ('HTTP_X_FORWARDED_', 'HTTP_FORWARDED', 'HTTP_X_REAL_IP', 'HTTP_VIA',
                  'HTTP_TRUE_CLIENT_IP', 'HTTP_CLIENT_IP', 'HTTP_X_CLIENT_IP',
                  'HTTP_CF_CONNECTING_IP')


def _loopback(host):
    if (host or '').lower() in ('localhost', 'localhost.'):
        return True
    try:
        return ipaddress.ip_address((host or '').strip('[]')).is_loopback
    except ValueError:
        return False


def register(app):
    """Sessions, the synchronizer token, the check before every view, the login pages."""
    login_manager.init_app(app)
    login_manager.user_loader(accounts.load_session_user)
    # Checked by check_request, only for browsers that send no Sec-Fetch-Site or Origin.
    app.config['WTF_CSRF_CHECK_DEFAULT'] = False
    app.config['WTF_CSRF_TIME_LIMIT'] = None  # as long as the session
    app.config['PERMANENT_SESSION_LIFETIME'] = dt.timedelta(seconds=app.config['SESSION_IDLE_TIMEOUT'])
    csrf.init_app(app)
    app.before_request(check_request)
    app.after_request(_audit)
    # A live view needs what its page needs (the audit log is for admins).
    app.view_functions['live.live_socket'].qm_action = _live_page_action
    app.register_blueprint(bp)
    app.add_template_global(can)
    app.add_template_global(refusal)
    app.add_template_global(principal)
    app.add_template_global(csrf_field)
    public(app.view_functions['static'])


def check_request():
    """Flask's ``before_request``: answer for the view when the request must be refused."""
    view = current_app.view_functions.get(request.endpoint) if request.endpoint else None
    if view is None or request.endpoint == 'static':
        # A 404 or 405 follows, or a static file, which anyone may read: no
        # need to look up who is asking.
        return None
    upgrade = request.url_rule.websocket
    who, refusal = _who()
    public = getattr(view, 'qm_public', False)
    if request.method in UNSAFE_METHODS and not public:
        g.audit = view  # written after the answer, taken or refused (_audit)
    if refusal is not None:
        return _refuse(401, refusal, upgrade)
    if who is None and not public and not login_required():
        who = LOCAL
    g.principal = who
    # A socket's Origin is checked whatever its credentials: a program sends
    # none, and a page on another site has no business opening one.
    if upgrade or who is None or who.via != 'token':
        reason = _cross_site(upgrade)
        if reason is not None:
            g.cross_site = True
            return _refuse(403, reason, upgrade)
    if public:
        return None
    if who is None:
        expired = g.pop('session_expired', False)
        return _refuse(401, 'your session expired: log in again' if expired else 'log in first',
                       upgrade)
    needed = getattr(view, 'qm_action', None)
    if callable(needed):
        needed = needed()
    if needed is None:
        if request.method in UNSAFE_METHODS:
            return _refuse(403, 'this route declares no permission', upgrade)
        needed = 'view'
    if not roles.may(who.role, needed):
        return _refuse(403, roles.refusal(who.role, needed), upgrade)
    if upgrade:
        g.socket_credential = Credential(
            who.via, who.name or '',
            key=(current_user.get_id() if who.via == 'session' else
                 request.headers.get('Authorization', '').partition(' ')[2].strip() or None),
            seen=session.get('seen', 0), idle_timeout=current_app.config['SESSION_IDLE_TIMEOUT'])
    return None


def on_task(default):
    """An action for :func:`action`: ``default``, or ``'admin-task'`` when the request's
    task type is declared admin-only.

    The task type is the submitted one (form or JSON ``task``), the periodic
    task named in the URL, or the task of the job named in the URL.
    """
    def decide():
        args = request.view_args or {}
        if 'job_id' in args:
            job = db.session.get(Job, args['job_id'])
            name = job.task if job is not None else None
        elif 'name' in args:
            name = args['name']
        elif request.is_json:
            name = _json_field('task')
        else:
            name = request.form.get('task')
        task_type = catalog.TASKS.get(name) if isinstance(name, str) else None
        return 'admin-task' if task_type is not None and task_type.role == 'admin' else default
    return decide


def _live_page_action():
    page = fragments.PAGES.get(request.args.get('view'))
    return page.action if page is not None else 'view'


def note(count=None, outcome=None, target=None, action=None):
    """Tell the audit entry of this request how many jobs it concerned, its outcome, its
    target, or its action when the view's own is too broad (``users``: which change)."""
    if action is not None:
        g.audit_action = action
    if count is not None:
        g.audit_count = count
    if outcome is not None:
        g.audit_outcome = outcome
    if target is not None:
        g.audit_target = target


def audit_entry(count=None, target=None):
    """This request's audit entry, outcome "done", for a command to commit with its change.

    For a view whose service writes the entry in its own transaction
    (:func:`app.jobs.submit_many`): after a successful answer the entry is
    not written again; after a failed one (the service rolled back) the
    refusal is written as for any other request.
    """
    who = principal()
    g.audit_entry = audit.entry(
        user=who.name if who else None, role=who.role if who else None,
        via=who.via if who else 'anonymous', action=g.get('audit_action') or _action_of(
            current_app.view_functions[request.endpoint]),
        target=target if target is not None else _target(), count=count,
        address=request.remote_addr)
    return g.audit_entry


def _action_of(view):
    needed = getattr(view, 'qm_action', None)
    try:
        return needed() if callable(needed) else needed or 'unknown'
    except Exception:
        return 'unknown'


def _target():
    if g.get('audit_target'):
        return g.audit_target
    args = request.view_args or {}
    rule = request.url_rule.rule
    if 'job_id' in args:
        return args['job_id']
    if 'token_id' in args:
        return f"token {args['token_id']}"
    if 'name' in args:
        kind = next(k for part, k in (('/queues/', 'queue'), ('/periodic/', 'periodic'),
                                      ('/users/', 'user')) if part in rule)
        return f"{kind} {args['name']}" + (f" -> {request.form.get('role')}"
                                           if rule.endswith('/role') else '')
    if request.endpoint == 'admin.create_user':
        return f"user {request.form.get('name', '')} ({request.form.get('role', '')})"
    if request.endpoint in ('pages.bulk_jobs', 'api.bulk_action'):
        if request.is_json:
            ids, filters = _json_field('ids'), _json_field('filter')
        else:
            ids = request.form.getlist('ids') if request.form.get('scope') != 'filter' else None
            filters = {k[2:]: v for k, v in request.form.items() if k.startswith('f.') and v}
        if isinstance(ids, list):
            return 'ids ' + ', '.join(str(i) for i in ids)
        if isinstance(filters, dict):
            return 'filter ' + (' '.join(f'{k}={v}' for k, v in filters.items()) or '(all jobs)')
    if request.endpoint in ('pages.create_job', 'api.submit_job'):
        task = _json_field('task') if request.is_json else request.form.get('task')
        return f'task {task}' if isinstance(task, str) else None
    return None


def _audit(response):
    """Flask's ``after_request``: write the audit entry of a state-changing request."""
    view = g.pop('audit', None)
    who = g.get('principal')
    if view is None or who is None or g.get('cross_site'):
        # Not kept: the refused attempts of nobody, and requests another site
        # made (in the name of whoever's browser it was): anyone could flood
        # the log with them.
        return response
    status = response.status_code
    if status < 400 and g.get('audit_entry') is not None:
        return response  # committed by the view's service, with its change
    outcome = g.get('audit_outcome') or ('done' if status < 400 else f'refused: {status} '
                                         f'{response.status.split(" ", 1)[-1].lower()}')
    count = g.get('audit_count')
    if count is None and status < 400 and 'job_id' in (request.view_args or {}):
        count = 1
    try:
        audit.record(user=who.name if who else None, role=who.role if who else None,
                     via=who.via if who else 'anonymous',
                     action=g.get('audit_action') or _action_of(view),
                     target=_target(), count=count, address=request.remote_addr,
                     outcome=outcome)
    except Exception:
        db.session.rollback()
        logger.exception('audit: entry not written for %s %s', request.method, request.path)
    return response


def _json_field(name):
    # Read before the body is checked (app.inputs, then the view, refuse a
    # bad one): whatever it holds, it only picks the action.
    try:
        body = request.get_json(silent=True)
    except Exception:
        return None
    return body.get(name) if isinstance(body, dict) else None


def on_bulk():
    """An action for :func:`action`: the bulk action asked for (``delete`` needs an admin)."""
    if request.is_json:
        asked = _json_field('action')
    else:
        asked = request.form.get('action')
    # An unknown action changes nothing (the view answers 400): any operator may ask.
    return asked if asked in ('retry', 'cancel', 'delete') else 'retry'


def _who():
    """``(Principal or None, refusal or None)`` from the token or the session."""
    header = request.headers.get('Authorization')
    if header is not None:
        scheme, _, token = header.partition(' ')
        if scheme.lower() != 'bearer':
            return None, 'send Authorization: Bearer <token>'
        if _scrape_token_fits(token.strip()):
            return SCRAPER, None
        known = accounts.token_cache().identity(token.strip())
        if known is None:
            return None, 'unknown or revoked token'
        return Principal(*known, 'token'), None
    if not current_user.is_authenticated:
        return None, None
    now = int(time.time())
    seen = session.get('seen', 0)
    if now - seen > current_app.config['SESSION_IDLE_TIMEOUT']:
        logout_user()
        session.clear()
        g.session_expired = True
        return None, None
    if now - seen >= 30:  # the cookie is rewritten twice a minute at most
        session['seen'] = now
    return Principal(current_user.name, current_user.role, 'session'), None


def _scrape_token_fits(token):
    """Whether ``token`` is the scrape token the requested view admits (:func:`scrape_token`)."""
    view = current_app.view_functions.get(request.endpoint) if request.endpoint else None
    key = getattr(view, 'qm_scrape_token', None)
    expected = current_app.config.get(key) if key else None
    return bool(expected) and hmac.compare_digest(token.encode(), expected.encode())


def _cross_site(upgrade):
    """Why this request may have been made by another site (None: it was not)."""
    if not (upgrade or request.method in UNSAFE_METHODS):
        return None
    origin = request.headers.get('Origin')
    if upgrade:
        # Browsers always send Origin with a WebSocket handshake.
        if origin is not None and not _same_host(origin):
            return f'a socket opened from another site ({origin[:100]}) is refused'
        return None
    site = request.headers.get('Sec-Fetch-Site')
    if site is not None:
        if site in ('same-origin', 'none'):  # 'none': typed or bookmarked by the user
            return None
        return f'a request from another site is refused (Sec-Fetch-Site: {site[:40]})'
    if origin is not None:
        return None if _same_host(origin) else f'a request from another site ({origin[:100]}) is refused'
    if current_app.session_interface.get_cookie_name(current_app) not in request.cookies:
        # Neither header and no cookie: not a browser acting on its session
        # (curl, a script), so nothing ambient to abuse (Go's
        # CrossOriginProtection reasons the same way).
        return None
    try:
        csrf.protect()
    except CSRFError as exc:
        return f'{exc.description} (reload the page and try again)'
    return None


def _same_host(origin):
    parts = urlsplit(origin)
    return parts.scheme in ('http', 'https', 'ws', 'wss') and parts.netloc.lower() == request.host.lower()


def _refuse(status, reason, upgrade):
    if upgrade:
        return live.refuse_socket(reason)
    if status == 401:
        if (request.blueprint in ('pages', 'admin') and request.method == 'GET'
                and not request.headers.get('HX-Request')):
            return redirect(url_for('auth.login', next=request.full_path.rstrip('?'),
                                    expired=1 if 'expired' in reason else None))
        if request.path.startswith('/api/') or request.path == '/metrics':
            resp = jsonify({'error': f'authentication required: {reason}; log in, or send '
                                     f'Authorization: Bearer <token>'})
            resp.status_code = 401
            resp.headers['WWW-Authenticate'] = 'Bearer realm="queue-manager"'
            return resp
    return errors.respond(status, reason)


def safe_path(target, default=None):
    r"""``target`` if it is a path on this site (never a way to another), else ``default``.

    Browsers drop tabs and newlines from URLs and read \ as /, so "/\t/evil"
    and "/\evil" would lead away: anything but printable ASCII is refused.
    """
    if (target and target.startswith('/') and not target.startswith('//')
            and all(' ' < ch < '\x7f' and ch != '\\' for ch in target)):
        parts = urlsplit(target)
        if not parts.scheme and not parts.netloc:
            return target
    return default


def _safe_next(target):
    # Where the login page leads: a path on this site, else the dashboard.
    return safe_path(target) or url_for('pages.dashboard')


@bp.route('/login', methods=['GET', 'POST'])
@public
def login():
    """The login form (no JavaScript needed); a POST logs in and goes back where it was sent from."""
    next_url = request.values.get('next') or ''
    context = {'next_url': _safe_next(next_url), 'name': '', 'error': None,
               'required': login_required(),
               'expired': bool(request.args.get('expired'))}
    if request.method == 'GET':
        return render_template('login.html', **context)
    name = request.form.get('name', '')[:accounts.MAX_NAME]
    password = request.form.get('password', '')
    address = request.remote_addr
    context['name'] = name
    wait = accounts.login_wait(name, address)
    if wait > 0:
        context['error'] = f'Too many failed logins: try again in {int(wait) + 1} s.'
        return render_template('login.html', **context), 429, {'Retry-After': str(int(wait) + 1)}
    accounts.login_failed(name, address)  # counted first: parallel guesses all count
    user = accounts.authenticate(name, password)
    if user is None:
        audit.record(user=name, role=None, via='anonymous', action='login', address=address,
                     outcome='wrong name or password')
        context['error'] = 'Wrong name or password.'
        return render_template('login.html', **context), 401
    accounts.login_succeeded(name, address)
    audit.record(user=user.name, role=user.role, via='session', action='login', address=address)
    session.clear()  # a fresh session: one fixed before login is worth nothing
    login_user(user)
    session.permanent = True
    session['seen'] = int(time.time())
    return redirect(_safe_next(next_url), 303)


@bp.post('/logout')
@public
def logout():
    """End this user's sessions (this browser's and any other's)."""
    who = principal()
    if who is not None and who.via == 'session':
        audit.record(user=who.name, role=who.role, via='session', action='logout',
                     address=request.remote_addr)
        # A copy of the cookie must not outlive the logout: the session id
        # it holds stops fitting (every session of the user ends).
        accounts.end_sessions(current_user._get_current_object())
    logout_user()
    session.clear()
    return redirect(url_for('auth.login'), 303)
