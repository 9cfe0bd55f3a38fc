"""Declared task types: their parameters, defaults and limits.

A task type is declared once, with :func:`task` or :func:`periodic` and
:class:`Param` objects, in a task module (``huey_tasks.py``; see
``TASK_MODULES``). The submit form, the JSON API, ``GET /api/tasks`` and validation all
read that one declaration.
"""
import datetime as dt
import math
import re
from dataclasses import dataclass, field
from functools import cached_property

from . import masking, roles

REQUIRED = object()

# Job-level fields of a submission; task parameters may not reuse these names.
OPTION_NAMES = ('task', 'params', 'queue', 'priority', 'delay', 'eta', 'retries',
                'retry_delay', 'timeout', 'idempotency_key')

# Limits on job-level options.
MAX_PRIORITY = 100
MAX_RETRIES = 100
MAX_RETRY_DELAY = 7 * 86400.0
MAX_DELAY = 366 * 86400.0
MAX_TIMEOUT = 7 * 86400.0

_TYPE_NAMES = {int: 'integer', float: 'number', str: 'string', bool: 'boolean'}


class ValidationError(Exception):
    """A submission with bad fields; ``fields`` maps field name to message.

    For many submissions at once (:func:`validate_many`) ``errors`` lists
    each bad field as ``{"index": 3, "field": "params.seconds", "message":
    "..."}`` (``fields`` then names it ``jobs[3].params.seconds``); else it
    is empty.
    """

    def __init__(self, fields, message='invalid job', errors=()):
        self.fields = fields
        self.message = message
        self.errors = list(errors)
        super().__init__(f'{message}: {fields}')

    @classmethod
    def of_jobs(cls, errors):
        """The error of many submissions: ``errors`` as :attr:`errors` holds them, each
        field named ``jobs[i].field`` (``jobs[i]`` for the item itself) in :attr:`fields`."""
        return cls({f'jobs[{e["index"]}]' + (f'.{e["field"]}' if e['field'] else ''):
                    e['message'] for e in errors}, 'invalid jobs', errors)

    def by_job(self):
        """This error for a body of many submissions (``{"jobs": [...]}``): its fields
        named as :meth:`of_jobs` names them (``jobs[3].params.x``, as the check of a body's
        text does) also listed by index in :attr:`errors`."""
        errors = []
        for name, message in self.fields.items():
            match = _JOB_FIELD.fullmatch(name)
            if match:
                errors.append({'index': int(match[1]), 'field': match[2] or '',
                               'message': message})
        return ValidationError(self.fields, self.message, errors)


_JOB_FIELD = re.compile(r'jobs\[([0-9]+)\](?:\.(.+))?', re.S)


# A whole number and a number as a form field may hold them (ASCII only,
# with ASCII spaces around: str.strip() also takes a no-break space).
_ASCII_SPACE = ' \t\n\r\f\v'
_FORM_INT = re.compile(r'[-+]?[0-9]+')
_FORM_NUMBER = re.compile(r'[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?')


def whole_number(text):
    """``text`` as an int, written as forms, query strings and command lines write one:
    ASCII digits with an optional sign, ASCII spaces around them.

    Raises ValueError ("must be a whole number") for anything else: Python's
    ``int()`` also takes '٣', '1_000' and no-break spaces.
    """
    number = text.strip(_ASCII_SPACE)
    if not _FORM_INT.fullmatch(number):
        raise ValueError('must be a whole number')
    try:
        return int(number)
    except ValueError:  # more digits than Python converts
        raise ValueError('must be a whole number') from None


@dataclass(frozen=True)
class Param:
    """One declared parameter of a task type.

    ``secret=True`` (strings only) marks a value that must never be shown:
    the job's row keeps it masked (``**** 4242``, see :mod:`app.masking`)
    in its ``params``, which every page, the API and search read, and the
    real value apart, in ``secret_params``, which only the broker reads to
    run the task (:meth:`TaskType.split`). What the task logs, raises or
    returns is stored with the value masked wherever it appears.
    """
    name: str
    type: type = str
    default: object = REQUIRED
    min: float | None = None
    max: float | None = None
    choices: tuple | None = None
    max_length: int = 1000
    help: str = ''
    secret: bool = False

    def __post_init__(self):
        if self.type not in _TYPE_NAMES:
            raise TypeError(f'{self.name}: type must be one of int, float, str, bool')
        if self.secret and self.type is not str:
            raise TypeError(f'{self.name}: only a str parameter can be secret')
        if self.name in OPTION_NAMES:
            raise ValueError(f'{self.name!r} is reserved for job options')
        if self.default is not REQUIRED:
            self.parse(self.default)  # a bad default is a declaration bug

    @property
    def required(self):
        return self.default is REQUIRED

    @property
    def type_name(self):
        return _TYPE_NAMES[self.type]

    def parse(self, raw, from_form=False):
        """Return the value of ``raw`` for this parameter or raise ``ValueError``.

        JSON values must already have the right type (an integer parameter
        does not take ``"3"``); form values are strings and are converted.
        """
        if from_form:
            raw = self._from_form(raw)
        if raw is None:
            if self.required:
                raise ValueError('is required')
            return self.default
        value = self._coerce(raw)
        if self.choices is not None and value not in self.choices:
            raise ValueError('must be one of ' + ', '.join(map(str, self.choices)))
        if self.min is not None and value < self.min:
            raise ValueError(f'must be at least {_fmt(self.min)}')
        if self.max is not None and value > self.max:
            raise ValueError(f'must be at most {_fmt(self.max)}')
        if self.type is str and len(value) > self.max_length:
            raise ValueError(f'must be at most {self.max_length} characters')
        return value

    def _from_form(self, raw):
        if self.type is bool:
            # An unchecked checkbox sends nothing at all.
            return raw not in (None, '', 'off', 'false', '0')
        if raw is None or (raw == '' and self.type is not str):
            return None
        if raw == '' and self.type is str and (self.required or self.secret):
            # A secret's field is never filled in again: left empty, it
            # takes its default.
            return None
        # Written as a form or query string writes numbers: ASCII digits
        # (Python's int() and float() also take '٣', '1_000' and 'infinity').
        if self.type is int:
            return whole_number(raw)
        if self.type is float:
            number = raw.strip(_ASCII_SPACE)
            if not _FORM_NUMBER.fullmatch(number):
                raise ValueError('must be a number')
            return float(number)
        return raw

    def _coerce(self, raw):
        if self.type is bool:
            if not isinstance(raw, bool):
                raise ValueError('must be true or false')
            return raw
        if self.type is int:
            if isinstance(raw, bool) or not isinstance(raw, int):
                if isinstance(raw, float) and raw.is_integer():
                    return int(raw)
                raise ValueError('must be a whole number')
            return raw
        if self.type is float:
            if isinstance(raw, bool) or not isinstance(raw, (int, float)):
                raise ValueError('must be a number')
            try:
                finite = math.isfinite(raw)
            except OverflowError:  # an integer with hundreds of digits
                finite = False
            if not finite:
                raise ValueError('must be a finite number')
            return float(raw)
        if not isinstance(raw, str):
            raise ValueError('must be a string')
        return raw

    def json_schema(self):
        """This parameter as a JSON Schema (draft 2020-12, as OpenAPI 3.1 has it).

        The same limits :meth:`parse` applies to a JSON value: type (or null,
        when the parameter has a default), choices, bounds, length; the
        default when there is one, the help as description.
        """
        # An optional value may be sent as null: it then takes its default.
        schema = {'type': self.type_name if self.required else [self.type_name, 'null']}
        if self.choices is not None:
            schema['enum'] = list(self.choices) + ([] if self.required else [None])
        if self.min is not None:
            schema['minimum'] = self.min
        if self.max is not None:
            schema['maximum'] = self.max
        if self.type is str:
            schema['maxLength'] = self.max_length
        if self.secret:
            # Sent, never shown back (the job shows it masked); even its
            # declared default is not written out.
            schema['writeOnly'] = True
            schema['format'] = 'password'
        elif self.default is not REQUIRED and self.default is not None:
            schema['default'] = self.default
        if self.help:
            schema['description'] = self.help
        return schema

    def to_dict(self):
        return {
            'name': self.name,
            'type': self.type_name,
            'required': self.required,
            'default': None if self.required else self.shown(self.default),
            'min': self.min,
            'max': self.max,
            'choices': list(self.choices) if self.choices is not None else None,
            'max_length': self.max_length if self.type is str else None,
            'help': self.help,
            'secret': self.secret,
        }

    def shown(self, value):
        """``value`` of this parameter as pages and the API may show it: masked if secret."""
        return masking.mask(value) if self.secret and isinstance(value, str) else value


def _fmt(number):
    return str(int(number)) if float(number).is_integer() else str(number)


@dataclass
class TaskType:
    """A declared task type; ``huey_tasks`` registers one per function."""
    name: str
    func: object
    params: tuple[Param, ...]
    description: str = ''
    retries: int | None = None       # None: the configured default
    retry_delay: float | None = None
    priority: int = 0
    timeout: float | None = None
    # Exceptions that mean "retrying cannot help": the job fails at once.
    no_retry: tuple = ()
    # Whether a job whose worker was lost mid-run may run again.
    rerun: bool = True
    # The lowest role that may submit, run now or trigger it (app.roles).
    role: str = 'operator'
    wrappers: dict = field(default_factory=dict)  # queue -> Huey TaskWrapper

    def param(self, name):
        for p in self.params:
            if p.name == name:
                return p
        return None

    @cached_property
    def secret_names(self):
        """The names of the secret parameters, in declared order (a tuple)."""
        return tuple(p.name for p in self.params if p.secret)

    def split(self, params):
        """``(shown, secret)``: ``params`` with each secret value masked, and the real secret
        values by name (``{}`` when the task has none).

        ``shown`` is what the job's row keeps in ``params``; ``secret`` goes in
        ``secret_params``, which nothing shows: the broker merges it back
        into the message that runs the task.
        """
        params = dict(params or {})
        if not self.secret_names:
            return params, {}
        secret = {name: params[name] for name in self.secret_names
                  if isinstance(params.get(name), str)}
        return {k: masking.mask(v) if k in secret else v for k, v in params.items()}, secret

    def job(self, **fields):
        """A submission of this task type as ``POST /api/jobs`` takes it (a dict).

        ``fields`` are its parameters and the job options (``delay``,
        ``eta``, ``queue``, ``priority``, ``retries``, ``retry_delay``,
        ``timeout``, ``idempotency_key``), told apart by name: no parameter
        may take an option's name. Nothing is checked here; submitting does.
        """
        if 'task' in fields:
            raise TypeError('task is the task type itself; it is not a field')
        params = fields.pop('params', None)
        named = {k: fields.pop(k) for k in list(fields) if k not in OPTION_NAMES}
        if params is None:
            params = {}
        if not isinstance(params, dict):
            # Passed on as given: submitting refuses it by its field, as the API does.
            return {'task': self.name, 'params': params, **fields}
        return {'task': self.name, 'params': {**params, **named}, **fields}

    def submit(self, **fields):
        """Submit a job of this task type from Python (see :mod:`app.producer`); the job.

        ``fields`` as for :meth:`job`. Raises ``app.producer.InvalidJob``,
        ``app.producer.BrokerUnavailable`` or ``app.producer.LedgerUnavailable``,
        writing nothing.
        """
        if not on_submit:
            raise RuntimeError('no producer: import the app package (app.producer) first')
        return on_submit[-1](self.job(**fields))

    def redactor(self, params):
        """A :class:`~app.masking.Redactor` of the secret values among ``params`` (the real ones)."""
        return masking.Redactor(self.split(params)[1].values())

    def to_dict(self, defaults):
        return {
            'name': self.name,
            'description': self.description,
            'params': [p.to_dict() for p in self.params],
            'retries': defaults['DEFAULT_RETRIES'] if self.retries is None else self.retries,
            'retry_delay': defaults['DEFAULT_RETRY_DELAY'] if self.retry_delay is None else self.retry_delay,
            'priority': self.priority,
            'timeout': self.timeout,
            'role': self.role,
            'rerun': self.rerun,
        }


# Every declared task type by name, filled in as the task modules are imported.
TASKS: dict[str, TaskType] = {}


@dataclass
class Periodic:
    """A task type run on a schedule (a crontab), by the leading consumer."""
    task: TaskType
    schedule: str            # the crontab, e.g. "0 3 * * *"
    validate: object         # huey.crontab(): datetime -> due?
    params: dict = field(default_factory=dict)

    @property
    def name(self):
        return self.task.name


PERIODIC: dict[str, Periodic] = {}


def split(task_name, params):
    """:meth:`TaskType.split` for the task type ``task_name``; an undeclared one has no secrets."""
    task_type = TASKS.get(task_name)
    return task_type.split(params) if task_type else (dict(params or {}), {})


def redactor(task_name, params):
    """:meth:`TaskType.redactor` for the task type ``task_name``; empty for an undeclared one."""
    task_type = TASKS.get(task_name)
    return task_type.redactor(params) if task_type else masking.Redactor()


# Called with each task type as it is declared (the broker registers it on
# every queue's Huey). A hook slot: this module never fills it.
on_declare = []

# Called with a submission dict by TaskType.submit (``sleep.submit(seconds=1)``);
# returns the job. A hook slot the wiring fills (app.producer, imported with
# the app package); this module never fills it.
on_submit = []


def register(task_type):
    """Add ``task_type`` to :data:`TASKS` and tell :data:`on_declare`.

    Raises ValueError when a task type of that name is already declared.
    """
    if task_type.name in TASKS:
        raise ValueError(f'task {task_type.name!r} is declared twice')
    TASKS[task_type.name] = task_type
    for listener in on_declare:
        listener(task_type)
    return task_type


def task(params=(), retries=None, retry_delay=None, priority=0, timeout=None,
         no_retry=(), rerun=True, role='operator'):
    """Declare a task type: the decorated function runs each of its jobs.

    ``params`` lists :class:`Param` objects. ``retries`` and ``retry_delay``
    (seconds) default to the configured policy; a submission may override
    both. ``no_retry`` lists exceptions that retrying cannot fix: the job
    fails on the spot. ``timeout`` (seconds) stops an attempt at its next
    ``progress()`` once it is over time. ``rerun=False`` marks a task that
    must not run twice: if its worker is lost mid-run the job fails instead
    of running again. ``role`` is the lowest role that may submit, run now
    or trigger its jobs (``'admin'`` for a destructive task, as ``purge``).
    The function gets ``task_type`` (a :class:`TaskType`). Raises ValueError
    when the name is already declared or ``role`` is not a role.
    """
    def decorator(func):
        doc = (func.__doc__ or '').strip().splitlines()
        func.task_type = register(TaskType(
            name=func.__name__, func=func, params=tuple(params),
            description=doc[0] if doc else '', retries=retries,
            retry_delay=retry_delay, priority=priority, timeout=timeout,
            no_retry=tuple(no_retry), rerun=rerun, role=roles.check(role)))
        # From Python: sleep.submit(seconds=1, delay=5), sleep.job(...) for submit_many.
        func.submit, func.job = func.task_type.submit, func.task_type.job
        return func
    return decorator


def periodic(minute='*', hour='*', day='*', month='*', day_of_week='*', run_with=None,
             **options):
    """Declare a task type (as :func:`task` does) that also runs on a crontab schedule.

    The schedule's fields are cron's (``minute='0', hour='3'``: 03:00 UTC
    every day); ``run_with`` gives the parameters of the scheduled runs.
    Raises ValueError for a field cron cannot read.
    """
    from huey import crontab  # a crontab parser; nothing of Huey's queues

    def decorator(func):
        func = task(**options)(func)
        schedule = ' '.join(map(str, (minute, hour, day, month, day_of_week)))
        PERIODIC[func.task_type.name] = Periodic(
            func.task_type, schedule, crontab(minute, hour, day, month, day_of_week),
            dict(run_with or {}))
        return func
    return decorator


@dataclass
class Submission:
    """A validated request to run a job."""
    task: TaskType
    params: dict
    queue: str
    priority: int
    eta: dt.datetime | None  # naive UTC; None runs at once
    retries: int
    retry_delay: float
    timeout: float | None = None
    idempotency_key: str | None = None


def _option(name, typ, lo=None, hi=None, max_length=1000, help=''):
    # Job-level options are parsed with the same rules as task parameters; the
    # underscore keeps them clear of the reserved-name check.
    return Param('_' + name, typ, default=None, min=lo, max=hi, max_length=max_length, help=help)


_OPTIONS = {
    'priority': _option('priority', int, 0, MAX_PRIORITY,
                        help="Higher runs first; default: the task's"),
    'delay': _option('delay', float, 0, MAX_DELAY, help='Seconds from now; not with eta'),
    'retries': _option('retries', int, 0, MAX_RETRIES,
                       help="Retries after a failed attempt; default: the task's, else DEFAULT_RETRIES"),
    'retry_delay': _option('retry_delay', float, 0, MAX_RETRY_DELAY,
                           help='Seconds before the first retry, doubling after each'),
    'eta': _option('eta', str, max_length=64,
                   help='When to run (ISO 8601; UTC without an offset), within a year; not with delay'),
    'queue': _option('queue', str, max_length=32, help='One of the configured queues'),
    'timeout': _option('timeout', float, 0.001, MAX_TIMEOUT,
                       help='Seconds an attempt may run, checked at each progress report'),
    'idempotency_key': _option('idempotency_key', str, max_length=200,
                               help='A key already used returns that job (200) instead'),
}


def submission_schema(config):
    """The body of ``POST /api/jobs`` as a JSON Schema, from the declarations :func:`validate` uses.

    One variant per task type (``oneOf``, told apart by ``task``) with its
    parameters; the job options are shared. What a schema cannot say is
    still checked by :func:`validate`: an ``eta`` within a year, and text
    that cannot be stored.
    """
    options = {name: spec.json_schema() for name, spec in _OPTIONS.items()}
    options['queue']['enum'] = list(config['QUEUES'])
    options['eta']['format'] = 'date-time'
    options['idempotency_key']['minLength'] = 1
    variants = []
    for task in TASKS.values():
        params = {'type': ['object', 'null'],
                  'properties': {p.name: p.json_schema() for p in task.params},
                  'additionalProperties': False}
        required = [p.name for p in task.params if p.required]
        if required:
            params['required'] = required
        variants.append({'title': task.name, 'description': task.description,
                         'properties': {'task': {'const': task.name}, 'params': params}})
    return {'type': 'object', 'required': ['task'], 'additionalProperties': False,
            'properties': {'task': {'type': 'string', 'enum': list(TASKS),
                                    'description': 'A declared task type (GET /api/tasks)'},
                           'params': {'type': ['object', 'null'],
                                      'description': "The task's parameters; missing ones "
                                                     "take their defaults"},
                           **options},
            'oneOf': variants, 'not': {'required': ['delay', 'eta']}}


def validate(data, config, from_form=False, now=None):
    """Check a submission and return a :class:`Submission`.

    ``data`` is the JSON body (``params`` nested) or, with ``from_form``, a
    flat mapping of form fields where parameters are named ``params.<name>``.
    Raises :class:`ValidationError` with every bad field at once.
    """
    errors = {}
    if not isinstance(data, dict):
        raise ValidationError({'body': 'must be a JSON object'})

    name = data.get('task')
    task_type = TASKS.get(name) if isinstance(name, str) else None
    if name in (None, ''):
        errors['task'] = 'is required'
    elif task_type is None:
        errors['task'] = 'unknown task; one of ' + ', '.join(sorted(TASKS))

    if from_form:
        raw_params = {k[len('params.'):]: v for k, v in data.items() if k.startswith('params.')}
        unknown = []
    else:
        unknown = [k for k in data if k not in OPTION_NAMES]
        raw_params = data.get('params', {})
        if raw_params is None:
            raw_params = {}
        if not isinstance(raw_params, dict):
            errors['params'] = 'must be an object'
            raw_params = {}
    for key in unknown:
        errors[key] = 'unknown field'

    params = {}
    if task_type is not None:
        for key in raw_params:
            # A form's fields of another task are what it showed before its
            # task was changed without JavaScript (no "Show its parameters"):
            # left over, not asked for.
            if task_type.param(key) is None and not from_form:
                errors[f'params.{key}'] = 'unknown parameter'
        for p in task_type.params:
            try:
                params[p.name] = p.parse(raw_params.get(p.name), from_form=from_form)
            except ValueError as exc:
                errors[f'params.{p.name}'] = str(exc)

    options = {}
    for key, spec in _OPTIONS.items():
        raw = data.get(key)
        if raw is None and not from_form:
            options[key] = spec.default  # absent (or null): its default, nothing to check
            continue
        if from_form and raw == '':
            raw = None
        try:
            options[key] = spec.parse(raw, from_form=from_form)
        except ValueError as exc:
            errors[key] = str(exc)

    if not from_form and options.get('idempotency_key') == '':
        # A program that sends a key means one (a variable left empty, say):
        # read as no key, its retry after a lost answer would make a second job.
        # (A form's empty field is no key.)
        errors['idempotency_key'] = 'must not be empty: leave it out for no key'
    queue = options.get('queue') or 'default'
    if 'queue' not in errors and queue not in config['QUEUES']:
        errors['queue'] = 'unknown queue; one of ' + ', '.join(config['QUEUES'])

    eta = None
    now = now or dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    if options.get('eta') is not None and 'eta' not in errors:
        try:
            eta = parse_eta(options['eta'])
        except ValueError as exc:
            errors['eta'] = str(exc)
        else:
            if eta - now > dt.timedelta(seconds=MAX_DELAY):
                errors['eta'] = 'must be within a year'
    if options.get('delay') is not None:
        if options.get('eta') is not None:
            errors['delay'] = 'give delay or eta, not both'
        else:
            eta = now + dt.timedelta(seconds=options['delay'])
    if eta is not None and eta <= now:
        eta = None  # due already: run at once

    if errors:
        raise ValidationError(errors)

    retries = options['retries']
    if retries is None:
        retries = config['DEFAULT_RETRIES'] if task_type.retries is None else task_type.retries
    retry_delay = options['retry_delay']
    if retry_delay is None:
        retry_delay = (config['DEFAULT_RETRY_DELAY'] if task_type.retry_delay is None
                       else task_type.retry_delay)
    priority = options['priority']
    if priority is None:
        priority = task_type.priority
    timeout = options['timeout'] if options['timeout'] is not None else task_type.timeout
    return Submission(task=task_type, params=params, queue=queue, priority=priority,
                      eta=eta, retries=retries, retry_delay=float(retry_delay),
                      timeout=timeout, idempotency_key=options['idempotency_key'] or None)


def validate_many(items, config, limit, now=None):
    """Check a list of submissions (each what :func:`validate` takes); their
    :class:`Submission` objects, in order.

    All or nothing: raises :class:`ValidationError` (``"invalid jobs"``)
    naming every bad field of every item, by index (see its ``errors``),
    when any is bad, when ``items`` is not a non-empty list, or when it
    holds more than ``limit`` items (then ``fields`` has ``jobs`` alone).
    """
    if not isinstance(items, list) or not items:
        raise ValidationError({'jobs': 'must be a non-empty list of jobs'}, 'invalid jobs')
    if len(items) > limit:
        raise ValidationError({'jobs': f'at most {limit} jobs a call (got {len(items)}): '
                                       f'split the batch'}, 'too many jobs')
    now = now or dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    subs, errors = [], []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            errors.append({'index': index, 'field': '', 'message': 'must be a JSON object'})
            continue
        try:
            subs.append(validate(item, config, now=now))
        except ValidationError as exc:
            errors.extend({'index': index, 'field': field, 'message': message}
                          for field, message in exc.fields.items())
    if errors:
        raise ValidationError.of_jobs(errors)
    return subs


def parse_eta(text):
    """An ISO 8601 time as naive UTC; a time without an offset is taken as UTC."""
    try:
        value = dt.datetime.fromisoformat(text.strip().replace('Z', '+00:00'))
    except ValueError:
        raise ValueError('must be an ISO 8601 time, e.g. 2026-01-31T12:00:00Z') from None
    if value.tzinfo is not None:
        try:
            value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
        except OverflowError:  # 0001-01-01T00:00+01:00 is before year 1 in UTC
            raise ValueError('must be a time between the years 1 and 9999') from None
    return value
