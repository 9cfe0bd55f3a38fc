"""Alert rules: what the deployment declares in ``ALERT_RULES``, parsed and checked once.

``ALERT_RULES`` is a JSON array of objects, one rule each::

    [{"name": "payments failing", "kind": "failure_rate", "task": "payment",
      "percent": 20, "minutes": 5, "min_jobs": 10},
     {"kind": "depth", "queue": "default", "above": 1000},
     {"kind": "oldest_waiting", "seconds": 300},
     {"kind": "no_consumer", "queue": "reports"}]

Kinds and their keys (``queue`` left out: every queue, each on its own):

- ``failure_rate``: ``percent`` (0 to 100) of the jobs finished in the last
  ``minutes`` (1 to 1440) failed, counted once at least ``min_jobs``
  (default 10) succeeded or failed in that window; per ``queue`` or per
  ``task`` (not both).
- ``depth``: the broker holds more than ``above`` messages ready to run.
- ``oldest_waiting``: the oldest job waiting to run has waited more than
  ``seconds``.
- ``no_consumer``: no consumer holds a lease for the queue.

``name`` (up to 100 characters) names the rule in alerts and webhooks; it
defaults to the kind and its queue or task (``depth default``) and must be
unique. :func:`parse` raises :class:`RuleError` naming the bad rule.
"""
import json
from typing import NamedTuple

FAILURE_RATE = 'failure_rate'
DEPTH = 'depth'
OLDEST_WAITING = 'oldest_waiting'
NO_CONSUMER = 'no_consumer'

# Each kind: its threshold's key (None: it has none), and its other keys with
# their defaults (required ones have none: ``...``).
KINDS = {
    FAILURE_RATE: ('percent', {'minutes': ..., 'min_jobs': 10, 'queue': None, 'task': None}),
    DEPTH: ('above', {'queue': None}),
    OLDEST_WAITING: ('seconds', {'queue': None}),
    NO_CONSUMER: (None, {'queue': None}),
}
MAX_NAME = 100
MAX_MINUTES = 1440  # a day: the per-minute rollups make any window cheap, a day is plenty


class RuleError(ValueError):
    """An alert rule that cannot be used; the message names the rule and what is wrong."""


class Rule(NamedTuple):
    """One alert rule.

    ``threshold``: percent (failure_rate), messages (depth), seconds
    (oldest_waiting), 0 (no_consumer). ``queue``/``task``: the one subject
    it watches, None for every queue. ``minutes`` and ``min_jobs`` only for
    failure_rate (else None).
    """
    name: str
    kind: str
    threshold: float
    queue: str | None = None
    task: str | None = None
    minutes: int | None = None
    min_jobs: int | None = None

    @property
    def scope(self):
        """What its subjects are: ``'task'`` or ``'queue'``."""
        return 'task' if self.task else 'queue'

    def subjects(self, queues):
        """The names it watches, given the configured ``queues``."""
        if self.task:
            return [self.task]
        return [self.queue] if self.queue else list(queues)


def _number(value, key, low, high, integer=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise RuleError(f'{key} must be a number')
    if integer and value != int(value):
        raise RuleError(f'{key} must be a whole number')
    if not low <= value <= high:
        raise RuleError(f'{key} must be between {low:g} and {high:g}')
    return int(value) if integer else float(value)


def _name(value, key):
    if not isinstance(value, str) or not value.strip():
        raise RuleError(f'{key} must be a non-empty string')
    if len(value) > MAX_NAME or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise RuleError(f'{key} must be at most {MAX_NAME} printable characters')
    return value.strip()


_LIMITS = {'percent': (0, 100, False), 'above': (0, 1e12, False),
           'seconds': (0, 366 * 86400, False), 'minutes': (1, MAX_MINUTES, True),
           'min_jobs': (1, 1e9, True)}


def _rule(item, queues):
    if not isinstance(item, dict):
        raise RuleError('must be a JSON object')
    kind = item.get('kind')
    if kind not in KINDS:
        raise RuleError(f'kind must be one of {", ".join(KINDS)}')
    threshold_key, others = KINDS[kind]
    allowed = {'name', 'kind', *others, *([threshold_key] if threshold_key else [])}
    unknown = sorted(set(item) - allowed)
    if unknown:
        raise RuleError(f'unknown key {unknown[0]!r} for kind {kind} '
                        f'(it takes {", ".join(sorted(allowed))})')
    values = {}
    for key in ([threshold_key] if threshold_key else []) + list(others):
        default = others.get(key, ...)
        if key not in item or item[key] is None:
            if default is ...:
                raise RuleError(f'{key} is required for kind {kind}')
            values[key] = default
        elif key in ('queue', 'task'):
            values[key] = _name(item[key], key)
        else:
            values[key] = _number(item[key], key, *_LIMITS[key])
    if values.get('queue') is not None and values['queue'] not in queues:
        raise RuleError(f'queue {values["queue"]!r} is not one of QUEUES ({", ".join(queues)})')
    if values.get('queue') and values.get('task'):
        raise RuleError('give queue or task, not both')
    subject = values.get('task') or values.get('queue')
    name = _name(item['name'], 'name') if 'name' in item else \
        f'{kind}{" " + subject if subject else ""}'
    return Rule(name=name, kind=kind,
                threshold=values[threshold_key] if threshold_key else 0.0,
                queue=values.get('queue'), task=values.get('task'),
                minutes=values.get('minutes'), min_jobs=values.get('min_jobs'))


def parse(raw, queues):
    """The rules in ``raw`` as a tuple of :class:`Rule`.

    ``raw``: the JSON text of ``ALERT_RULES`` (None or empty: no rules), or
    a list already decoded (of dicts or :class:`Rule`). ``queues``: the
    configured queue names, which a rule's ``queue`` must be one of.
    Raises :class:`RuleError` naming the first bad rule by its position
    (from 1) and name.
    """
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return ()
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError as exc:
            raise RuleError(f'not JSON: {exc}') from None
    if not isinstance(raw, (list, tuple)):
        raise RuleError('must be a JSON array of rules')
    rules, names = [], set()
    for n, item in enumerate(raw, 1):
        label = f'rule {n}'
        if isinstance(item, dict) and isinstance(item.get('name'), str):
            label += f' ({item["name"][:MAX_NAME]!r})'
        try:
            rule = item if isinstance(item, Rule) else _rule(item, queues)
        except RuleError as exc:
            raise RuleError(f'{label}: {exc}') from None
        if rule.name in names:
            raise RuleError(f'{label}: another rule is named {rule.name!r}; give each its own name')
        names.add(rule.name)
        rules.append(rule)
    return tuple(rules)


def check_tasks(rules, tasks):
    """Raise :class:`RuleError` if a rule names a task type not among ``tasks`` (names)."""
    for n, rule in enumerate(rules, 1):
        if rule.task is not None and rule.task not in tasks:
            raise RuleError(f'rule {n} ({rule.name!r}): task {rule.task!r} is not a declared '
                            f'task type')
