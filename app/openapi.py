"""The JSON API's contract, served as an OpenAPI 3.1 document at ``/api/openapi.json``.

Each API view carries a declaration (:func:`declare`): its query parameters
(:class:`Query`, which also parse them), its body (a schema built from the
declarations the view validates with: ``POST /api/jobs`` from the task
catalog) and its responses. :func:`document` walks the app's routes and
turns those declarations, plus the response shapes below, into the
document; a route without a declaration is an error, so the document
cannot leave one out.
"""
import re
from dataclasses import dataclass, field

from . import catalog, roles, rules, states

OPENAPI = '3.1.0'


def _null(schema):
    """``schema`` or null."""
    return {**schema, 'type': [schema['type'], 'null']}


_STR = {'type': 'string'}
_INT = {'type': 'integer'}
_NUM = {'type': 'number'}
_BOOL = {'type': 'boolean'}
_TIME = {'type': 'string', 'format': 'date-time',
         'description': 'ISO 8601 in UTC with milliseconds, e.g. 2026-01-31T12:00:00.000Z'}


def _object(properties, required=None, **extra):
    return {'type': 'object', 'properties': properties,
            'required': list(properties) if required is None else required, **extra}


def _ref(name):
    return {'$ref': f'#/components/schemas/{name}'}


def _schemas(config):
    """Every response shape, by name."""
    job_states = list(states.JOB_STATES)
    counts = {'type': 'object', 'additionalProperties': _INT}
    attempt = _object({
        'number': _INT, 'state': _STR, 'worker': _null(_STR),
        'started_at': _null(_TIME), 'finished_at': _null(_TIME),
        'duration': _null({**_NUM, 'description': 'seconds'}),
        'error': _null({**_STR, 'description': '"Type: message"'}),
        'error_type': _null(_STR), 'error_message': _null(_STR), 'traceback': _null(_STR)})
    job_properties = {
        'id': _STR, 'task': _STR, 'queue': _STR,
        'params': {'type': 'object', 'description': 'the parameters; a secret one masked '
                                                    '("**** 4242")'},
        'state': {'type': 'string', 'enum': job_states}, 'priority': _INT,
        'progress': _null({**_NUM, 'description': 'fraction 0 to 1 of the current attempt'}),
        'progress_message': _null(_STR),
        'result': {'description': 'what the task returned (any JSON), once it succeeded'},
        'error': _null({**_STR, 'description': 'the latest failed attempt\'s "Type: message"'}),
        'error_type': _null(_STR), 'retries': _INT, 'retry_delay': _NUM,
        'attempt_count': _INT, 'worker': _null(_STR), 'timeout': _null(_NUM),
        'cancel_requested_at': _null(_TIME), 'idempotency_key': _null(_STR),
        'created_at': _TIME, 'scheduled_for': _null(_TIME), 'started_at': _null(_TIME),
        'finished_at': _null(_TIME),
        'run_seconds': _null({**_NUM, 'description': 'seconds the latest attempt that ended '
                                                     'ran (its duration)'}),
        'updated_at': _TIME,
        'version': {**_INT, 'description': 'grows with every change'},
    }
    job = _object(job_properties)
    job_with_attempts = _object({
        **job_properties, 'attempts': {'type': 'array', 'items': _ref('Attempt')},
        'events': {'type': 'array', 'description': 'what happened to the job outside its '
                                                   'attempts (a repair, say)',
                   'items': _object({'at': _TIME, 'kind': _STR, 'message': _STR})}})
    param = _object({
        'name': _STR, 'type': {'type': 'string', 'enum': ['integer', 'number', 'string', 'boolean']},
        'required': _BOOL, 'default': {}, 'min': _null(_NUM), 'max': _null(_NUM),
        'choices': _null({'type': 'array'}), 'max_length': _null(_INT), 'help': _STR,
        'secret': {**_BOOL, 'description': 'shown masked ("**** 4242") wherever the job is '
                                           'shown; its default too'}})
    task = _object({'name': _STR, 'description': _STR,
                    'params': {'type': 'array', 'items': _ref('TaskParam')},
                    'retries': _INT, 'retry_delay': _NUM, 'priority': _INT,
                    'timeout': _null(_NUM), 'rerun': _BOOL,
                    'role': {'type': 'string', 'enum': list(roles.ROLES),
                             'description': 'the lowest role that may submit it'}})
    worker = _object({'id': _STR, 'host': _STR, 'pid': _INT,
                      'queues': {'type': 'array', 'items': _STR}, 'concurrency': _INT,
                      'started_at': _TIME, 'last_seen': _TIME, 'stopped_at': _null(_TIME),
                      'processed': _INT, 'failed': _INT,
                      'current': {'type': 'array', 'items': _STR}, 'leader': _BOOL,
                      'online': _BOOL})
    queue = _object({'name': {'type': 'string', 'enum': list(config['QUEUES'])},
                     'paused': _null(_BOOL), 'depth': _null(_INT),
                     'scheduled_messages': _null(_INT),
                     **{s: _INT for s in ('queued', 'running', 'scheduled', 'retrying',
                                          'failed', 'succeeded', 'per_minute')},
                     'per_minute_15': _NUM})
    periodic = _object({'name': _STR, 'description': _STR, 'schedule': _STR,
                        'params': {'type': 'object'}, 'paused': _null(_BOOL),
                        'last': {'oneOf': [{'type': 'null'}, _object(
                            {'id': _STR, 'state': {'type': 'string', 'enum': job_states},
                             'created_at': _TIME})]},
                        'next_run': _null(_TIME)})
    error = _object({
        'error': _STR,
        'fields': {'type': 'object', 'additionalProperties': _STR,
                   'description': 'field (e.g. params.seconds) -> what is wrong with it'},
        'errors': {'type': 'array', 'description': 'a batch: each bad field by the index of '
                                                   'its job ("field" empty: the whole job); '
                                                   'empty when the body as a whole is at '
                                                   'fault (see "fields")',
                   'items': _object({'index': _INT, 'field': _STR, 'message': _STR})},
        'state': {**_STR, 'description': 'the state a 409 found the job in'},
        'detail': {**_STR, 'description': 'why the broker refused (503)'},
        'unconfirmed': {'type': 'array', 'items': _STR, 'description': (
            'a 503 of a submission: ids of jobs the broker may still hold although no row '
            'was written (it failed after taking them, and could not be reached to give '
            'them back); each runs if it did, its row written then')},
        'recorded': {'type': 'array', 'items': _STR, 'description': (
            'a 503 of a submission: those of "unconfirmed" submitted with an idempotency key, '
            'whose rows were kept: each runs once when the broker is back, and submitting '
            'again with its key returns it')}},
        required=['error'])
    return {
        'Job': job, 'JobWithAttempts': job_with_attempts, 'Attempt': attempt,
        'JobPage': _object({'jobs': {'type': 'array', 'items': _ref('Job')},
                            'next': _null({**_STR, 'description': (
                                'cursor of the next page; null after the last. A search '
                                'shorter than 3 characters looks at 5,000 jobs a page, one '
                                'matching more than 500 jobs at 20,000, so a page may hold '
                                'fewer jobs than `limit` (even none) and still have a '
                                '`next`')})}),
        'JobList': _object({'jobs': {'type': 'array', 'items': _ref('Job')}}),
        'JobBatch': _object({'jobs': {'type': 'array', 'items': _ref('Job'),
                                      'description': 'the jobs, in the order submitted'},
                             'created': {'type': 'array', 'items': _BOOL,
                                         'description': 'false where an idempotency key named '
                                                        'a job already recorded (that job)'}}),
        'JobLog': _object({'attempts': {'type': 'object', 'additionalProperties': {
            'type': 'array', 'items': _object({'at': _TIME, 'level': _STR, 'message': _STR})}}}),
        'TaskParam': param,
        'Tasks': _object({'tasks': {'type': 'array', 'items': task},
                          'queues': {'type': 'array', 'items': _STR}}),
        'Stats': _object({'states': {**counts, 'required': job_states},
                          'queues': {'type': 'object', 'additionalProperties': counts},
                          'total': _INT}),
        'Workers': _object({'workers': {'type': 'array', 'items': worker}}),
        'Audit': _object({'entries': {'type': 'array', 'items': _object({
            'id': _INT, 'at': _TIME, 'user': _null(_STR), 'role': _null(_STR), 'via': _STR,
            'action': _STR, 'target': _null(_STR), 'count': _null(_INT),
            'address': _null(_STR), 'outcome': _STR})},
            'next': _null({**_INT, 'description': 'the `before` of the next page'})}),
        'Alerts': _object({
            'alerts': {'type': 'array', 'items': _object({
                'id': _INT, 'rule': _STR, 'kind': {'type': 'string', 'enum': list(rules.KINDS)},
                'scope': {'type': 'string', 'enum': ['queue', 'task']}, 'subject': _STR,
                'state': {'type': 'string', 'enum': ['firing', 'resolved']},
                'fired_at': _TIME, 'resolved_at': _null(_TIME),
                'value': {**_NUM, 'description': 'what crossed: percent, messages, seconds '
                                                 'or consumers online'},
                'threshold': _NUM, 'message': _STR, 'resolution': _null(_STR),
                'delivery': {'type': 'string', 'enum': ['pending', 'sent', 'off'],
                             'description': 'the webhook: a message due, all sent, or none '
                                            'configured'},
                'notified': _null({**_STR, 'description': 'the last state the webhook was told'}),
                'delivered_at': _null(_TIME), 'delivery_attempts': _INT,
                'delivery_error': _null({**_STR, 'description': 'why the last try failed'})})},
            'firing': {**_INT, 'description': 'alerts firing now'},
            'next': _null({**_INT, 'description': 'the `before` of the next page'})}),
        'BulkResult': _object({'action': {'type': 'string', 'enum': ['retry', 'cancel', 'delete']},
                               'matched': _INT, 'done': _INT, 'skipped': counts,
                               'truncated': _BOOL}),
        'Failures': _object({'groups': {'type': 'array', 'items': _object(
            {'task': _STR, 'error_type': _null(_STR), 'count': _INT, 'latest': _ref('Job')})}}),
        'Queue': queue,
        'Queues': _object({'queues': {'type': 'array', 'items': _ref('Queue')}}),
        'Periodic': periodic,
        'PeriodicList': _object({'periodic': {'type': 'array', 'items': _ref('Periodic')}}),
        'Health': _object({'status': {'type': 'string', 'enum': ['ok', 'unavailable']},
                           'broker': _STR, 'broker_kind': _STR, 'database': _STR,
                           'broker_loss': {**_object({'at': _TIME, 'restored': {}}),
                                           'description': 'the broker lost data within the '
                                                          'last day; the ledger restored it'}},
                          required=['status', 'broker', 'broker_kind', 'database']),
        'OpenAPI': {'type': 'object', 'description': 'this document'},
        'Error': error,
    }


# -- declarations ----------------------------------------------------------------

@dataclass(frozen=True)
class Query:
    """A query parameter of an API route: documented and parsed from this one declaration.

    ``maximum`` is a number or the name of the configuration key that holds
    it (``'MAX_PAGE_SIZE'``). Values are parsed as form values are
    (:meth:`app.catalog.Param.parse` with ``from_form``).
    """
    name: str
    type: type = str
    choices: tuple | None = None
    minimum: float | None = None
    maximum: float | str | None = None
    max_length: int = 1000
    help: str = ''

    def param(self, config):
        """The :class:`~app.catalog.Param` that parses and describes it under ``config``."""
        maximum = config[self.maximum] if isinstance(self.maximum, str) else self.maximum
        # The underscore keeps the name clear of the reserved job-option names.
        return catalog.Param('_' + self.name, self.type, default=None, min=self.minimum,
                             max=maximum, choices=self.choices, max_length=self.max_length,
                             help=self.help)

    def parse(self, args, config):
        """Its value in ``args``, None when absent or empty.

        Raises :class:`~app.catalog.ValidationError` (a 400) naming it.
        """
        raw = args.get(self.name)
        if raw in (None, ''):
            return None
        try:
            return self.param(config).parse(raw, from_form=True)
        except ValueError as exc:
            raise catalog.ValidationError({self.name: str(exc)}, f'{self.name} {exc}') from None

    def to_openapi(self, config):
        """Its OpenAPI Parameter Object (``in: query``)."""
        schema = self.param(config).json_schema()
        schema['type'] = self.param(config).type_name  # a query string has no null
        schema.pop('description', None)
        # Empty is as good as absent (an HTML form sends every field).
        if 'enum' in schema:
            schema['enum'] = [v for v in schema['enum'] if v is not None] + ['']
        elif self.type is not str:
            schema = {'anyOf': [schema, {'const': ''}]}
        return {'name': self.name, 'in': 'query', 'required': False,
                'description': self.help, 'schema': schema}


# Row ids are 64-bit integers on both databases: a larger cursor is no page's.
MAX_ROW_ID = 2**63 - 1
# The cursor of the pages of audit entries and alerts, on the API and the pages alike.
BEFORE = Query('before', int, minimum=1, maximum=MAX_ROW_ID,
               help='The `next` value of the previous page')


def parse_query(params, args, config):
    """``{name: value or None}`` for the declared query ``params`` in ``args``."""
    return {p.name: p.parse(args, config) for p in params}


@dataclass(frozen=True)
class Operation:
    """What an API view declares: query parameters, body and responses."""
    query: tuple = ()
    body: object = None        # config -> JSON Schema of the body
    responses: dict = field(default_factory=dict)  # status -> (schema name | None, description)
    headers: dict = field(default_factory=dict)    # status -> {header: description}


# A response's schema name for a plain-text body (``/metrics``).
TEXT = 'text/plain'


def declare(query=(), body=None, responses=None, headers=None):
    """Attach a declaration to an API view (the decorator goes under the route's).

    ``responses`` maps each success status to ``(schema name, description)``
    (schema None: no body; :data:`TEXT`: plain text); :func:`document` adds the errors every route
    can answer with (400; 404 with path parameters; 413 with a body) to
    those listed.
    """
    def attach(view):
        view.openapi = Operation(tuple(query), body, dict(responses or {}), dict(headers or {}))
        return view
    return attach


_ERRORS = {
    400: 'Invalid input: `fields` names each bad field (text that cannot be stored, '
         'a bad value, an unknown field)',
    401: 'No credentials, or an unknown or revoked token: send `Authorization: Bearer <token>`',
    403: "The token's role may not do this (the reason says who may)",
    404: 'No such job, queue or periodic task',
    409: "The job's state does not allow this; `state` says what it is",
    413: 'The body is larger than MAX_CONTENT_LENGTH',
    503: 'The broker (or the database) did not answer; nothing was changed',
}
_PATH_ARGUMENT = re.compile(r'<(?:[^:<>]+:)?([^<>]+)>')


def _operation(rule, method, view, declared, config):
    doc = (view.__doc__ or '').strip().splitlines()
    operation = {'operationId': rule.endpoint.split('.', 1)[1] + (
                     '' if len(rule.methods - {'HEAD', 'OPTIONS'}) == 1 else f'_{method.lower()}'),
                 'summary': doc[0] if doc else rule.endpoint,
                 'tags': ['health' if rule.endpoint.startswith('health.') else 'api']}
    parameters = [{'name': name, 'in': 'path', 'required': True,
                   'schema': {'type': 'string', 'minLength': 1}} for name in rule.arguments]
    parameters += [q.to_openapi(config) for q in declared.query]
    if parameters:
        operation['parameters'] = parameters
    if declared.body is not None:
        operation['requestBody'] = {'required': True, 'content': {
            'application/json': {'schema': declared.body(config)}}}
    responses = dict(declared.responses)
    responses.setdefault(400, ('Error', _ERRORS[400]))
    # Every route but the public ones (app.auth marks them) needs a token or
    # a session, and a role that may take its action.
    if not getattr(view, 'qm_public', False):
        operation['security'] = [{'bearer': []}]
        responses.setdefault(401, ('Error', _ERRORS[401]))
        responses.setdefault(403, ('Error', _ERRORS[403]))
    if rule.arguments:
        responses.setdefault(404, ('Error', _ERRORS[404]))
    if declared.body is not None:
        responses.setdefault(413, ('Error', _ERRORS[413]))
    operation['responses'] = {}
    for status in sorted(responses):
        entry = responses[status]
        name, description = entry if isinstance(entry, tuple) else (entry, _ERRORS.get(status, ''))
        response = {'description': description or name}
        if name == TEXT:
            # The Prometheus text format names its version in the media type.
            response['content'] = {'text/plain; version=0.0.4': {'schema': _STR}}
        elif name is not None:
            response['content'] = {'application/json': {'schema': _ref(name)}}
        if status in declared.headers:
            response['headers'] = {h: {'description': d, 'required': True, 'schema': _STR}
                                   for h, d in declared.headers[status].items()}
        operation['responses'][str(status)] = response
    return operation


def document(app):
    """The OpenAPI 3.1 document of ``app``'s JSON API (the ``api`` and ``health`` blueprints).

    Raises ``LookupError`` for an API route that carries no declaration.
    """
    config = app.config
    paths = {}
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        if not rule.endpoint.startswith(('api.', 'health.')):
            continue
        view = app.view_functions[rule.endpoint]
        declared = getattr(view, 'openapi', None)
        if declared is None:
            raise LookupError(f'the API route {rule.endpoint} has no declaration')
        path = _PATH_ARGUMENT.sub(r'{\1}', rule.rule)
        for method in sorted(rule.methods - {'HEAD', 'OPTIONS'}):
            paths.setdefault(path, {})[method.lower()] = _operation(
                rule, method, view, declared, config)
    return {
        'openapi': OPENAPI,
        'info': {'title': 'queue-manager', 'version': '1',
                 'description': 'Submit background jobs, follow them, act on them. '
                                'Errors are JSON objects with an "error" message.'},
        'paths': paths,
        'components': {'schemas': _schemas(config),
                       'securitySchemes': {'bearer': {
                           'type': 'http', 'scheme': 'bearer',
                           'description': 'An API token (`flask --app wsgi tokens create`); '
                                          'a browser session works too'}}},
    }
