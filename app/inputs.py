"""Input at the edge: text that cannot be stored or shown never gets in.

Every request's path, query string and form fields are checked before its
view runs (pages, the JSON API and the live socket alike); a view that reads
a JSON body gets it from :func:`json_object`, which checks it the same way.
Bytes that are not UTF-8, lone UTF-16 surrogates (JSON's ``"\\ud800"``) and
NUL characters are refused with a 400 that names the field, e.g.
``{"params.message": "contains an unpaired surrogate (U+D800)"}``; nothing
downstream ever sees them.
"""
import functools
import io
import json
from urllib.parse import unquote_to_bytes

from flask import current_app, request
from werkzeug.exceptions import UnsupportedMediaType
from werkzeug.wsgi import get_content_length

from . import catalog, text

_BODY_METHODS = ('POST', 'PUT', 'PATCH', 'DELETE')
_FORM_TYPES = ('application/x-www-form-urlencoded',)
NOT_UTF8 = 'is not valid UTF-8'


def _invalid(fields, message='invalid request'):
    return catalog.ValidationError(fields, message)


def _undecodable(raw, separator=b'&'):
    """``{field: message}`` for the fields of a URL-encoded string that are not UTF-8."""
    found = {}
    for pair in raw.split(separator):
        if not pair:
            continue
        key, _, value = pair.partition(b'=')
        key, value = (unquote_to_bytes(part.replace(b'+', b' ')) for part in (key, value))
        try:
            name = key.decode('utf-8')
        except UnicodeDecodeError:
            found[text.clean(key.decode('utf-8', 'replace'))] = 'its name ' + NOT_UTF8
            continue
        try:
            value.decode('utf-8')
        except UnicodeDecodeError:
            found.setdefault(text.clean(name), NOT_UTF8)
    return found


def check_request():
    """Refuse a request whose path, query or form holds text that cannot be stored.

    Registered with ``before_request``. Raises ``UnsupportedMediaType`` (415)
    for a multipart body, and :class:`~app.catalog.ValidationError` (``"invalid request"``, a 400)
    naming each bad field: ``path``, a path parameter (``job_id``), a query
    parameter or a form field.
    """
    if request.method in _BODY_METHODS and request.mimetype == 'multipart/form-data':
        # No form here uploads a file, so none is sent multipart; and its
        # parser would turn bytes that are not UTF-8 into U+FFFD unseen.
        raise UnsupportedMediaType('forms are sent URL-encoded '
                                   '(application/x-www-form-urlencoded), not multipart')
    fields = {}
    path = request.environ.get('PATH_INFO', '')
    try:
        # WSGI hands the path over as Latin-1; its bytes must be UTF-8.
        path.encode('latin-1').decode('utf-8')
    except UnicodeError:
        fields['path'] = NOT_UTF8
    fields.update(text.problems(request.view_args or {}))
    fields.update(_undecodable(request.query_string))
    fields.update(text.problems(request.args))
    if request.method in _BODY_METHODS and request.mimetype in _FORM_TYPES:
        # Read once and kept: the form is parsed from the same bytes.
        fields.update(_undecodable(request.get_data(cache=True)))
        fields.update(text.problems(request.form))
    if fields:
        raise _invalid(dict(list(fields.items())[:text.MAX_FIELDS]))


class SizedBody:
    """WSGI middleware: a body sent without a length (chunked) gets one before the app reads it.

    Werkzeug stops reading a body without ``Content-Length`` at the route's
    limit and says nothing, so a chunked body over it reached the view cut
    short (a 400 "not valid JSON" instead of a 413). Here such a body is read
    up to its path's limit + 1 bytes (``limits``: bytes by path, else
    ``limit``) and handed on with its length, so the route's limit applies
    to it as to any other: over it, 413. A body over the limit is not read
    further, so no more than that is held before the request is checked.
    """

    def __init__(self, wsgi_app, limit, limits=None):
        self.wsgi_app = wsgi_app
        self.limit = limit
        self.limits = dict(limits or {})

    def __call__(self, environ, start_response):
        if (environ.get('REQUEST_METHOD') in _BODY_METHODS
                and environ.get('wsgi.input_terminated')
                and get_content_length(environ) is None):  # chunked, or no length given
            limit = self.limits.get(environ.get('PATH_INFO'), self.limit)
            data = environ['wsgi.input'].read(limit + 1)
            environ['wsgi.input'] = io.BytesIO(data)
            environ['CONTENT_LENGTH'] = str(len(data))
            environ.pop('HTTP_TRANSFER_ENCODING', None)  # read: now a body of that length
        return self.wsgi_app(environ, start_response)


def body_limit(config_key):
    """View decorator: the route takes bodies of up to ``app.config[config_key]`` bytes
    instead of ``MAX_CONTENT_LENGTH`` (over it, 413).

    :func:`route_limits` reads it too, so that :class:`SizedBody` reads a
    chunked body of that route up to the same limit: the route's limit is
    named here alone.
    """
    def decorate(view):
        @functools.wraps(view)
        def limited(*args, **kwargs):
            request.max_content_length = current_app.config[config_key]
            return view(*args, **kwargs)
        limited.body_limit = config_key
        return limited
    return decorate


def route_limits(app):
    """``{path: bytes}``: the routes of ``app`` with a :func:`body_limit`, for :class:`SizedBody`.

    Raises ValueError for such a route with a variable part (SizedBody
    knows paths, not patterns).
    """
    limits = {}
    for rule in app.url_map.iter_rules():
        key = getattr(app.view_functions.get(rule.endpoint), 'body_limit', None)
        if key is None:
            continue
        if rule.arguments:
            raise ValueError(f'{rule.rule}: a body limit is for a route without variables')
        limits[rule.rule] = app.config[key]
    return limits


def _refuse_constant(name):
    raise ValueError(f'{name} is not a JSON value')


class _RepeatedName(ValueError):
    """An object of a JSON body names one member twice."""


def _unique_names(pairs):
    # RFC 8259 (section 4): names within an object should be unique; where
    # they are not, parsers disagree on which value counts. Python's keeps
    # the last, a proxy or another client may read the first, so the body
    # is refused instead of read one of those ways.
    members = dict(pairs)
    if len(members) != len(pairs):
        seen = set()
        for name, _value in pairs:
            if name in seen:
                raise _RepeatedName(name)
            seen.add(name)
    return members


def json_object(message='invalid request'):
    """The request's JSON body, a dict whose text can all be stored.

    The body must be UTF-8 JSON (RFC 8259) holding an object, nested at most
    :data:`~app.text.MAX_DEPTH` levels, with no object naming a member
    twice; ``NaN`` and ``Infinity`` are not JSON. Raises
    :class:`~app.catalog.ValidationError` (a 400): ``"invalid
    request"`` with a ``body`` field for a body that is none of that, or
    ``message`` naming each field whose text cannot be stored
    (``params.message``, ``ids[3]``).
    """
    if not request.is_json:
        raise _invalid({'body': 'must be a JSON object (Content-Type: application/json)'})
    raw = request.get_data(cache=True)
    try:
        body = raw.decode('utf-8')
    except UnicodeDecodeError as exc:
        raise _invalid({'body': f'{NOT_UTF8} (byte {exc.start})'}) from None
    try:
        value = json.loads(body, parse_constant=_refuse_constant, object_pairs_hook=_unique_names)
    except RecursionError:
        raise _invalid({'body': f'is nested more than {text.MAX_DEPTH} levels deep'}) from None
    except _RepeatedName as exc:
        name = text.storable(exc.args[0], 100)
        raise _invalid({'body': f'names {json.dumps(name, ensure_ascii=False)} twice in one '
                                f'object: each name may appear once'}) from None
    except ValueError as exc:
        raise _invalid({'body': f'is not valid JSON: {exc}'}) from None
    if not isinstance(value, dict):
        raise _invalid({'body': 'must be a JSON object'})
    bad = text.json_problems(body, value)
    if bad:
        raise _invalid(bad, message)
    return value
