"""Who may do what: three roles, each allowed what the one below may do and more.

- ``viewer`` sees every page and API read, and changes nothing;
- ``operator`` also submits, retries, cancels, runs now, pauses and resumes
  queues and periodic tasks;
- ``admin`` also deletes (one job or in bulk), purges, runs the task types
  declared admin-only (``@task(role='admin')``, as ``purge``), reads the
  audit log and manages users and API tokens.

Each action is named once here with its lowest role; views declare theirs
(:func:`app.auth.action`).

The idea of fixed, ordered roles with per-action permissions is Oban Web's
(its resolver's ``can?/2``); Hangfire and bull-board offer only a read-only
switch.
"""
ROLES = ('viewer', 'operator', 'admin')  # lowest first

# Every action a request can take: the lowest role allowed it, and how a
# refusal names it ("only admins may delete jobs").
ACTIONS = {
    'view': ('viewer', 'see this'),
    'submit': ('operator', 'submit jobs'),
    'retry': ('operator', 'retry jobs'),
    'cancel': ('operator', 'cancel jobs'),
    'run-now': ('operator', 'run jobs now'),
    'pause': ('operator', 'pause queues and periodic tasks'),
    'resume': ('operator', 'resume queues and periodic tasks'),
    'trigger': ('operator', 'start periodic tasks'),
    'delete': ('admin', 'delete jobs'),
    'admin-task': ('admin', 'run this task (it is declared admin-only, as purge is)'),
    'audit': ('admin', 'read the audit log'),
    'users': ('admin', 'manage users and API tokens'),
}


class UnknownRole(ValueError):
    """A role name that is not one of :data:`ROLES`."""


def check(role):
    """Return ``role`` if it is one of :data:`ROLES`; raise :class:`UnknownRole` if not."""
    if role not in ROLES:
        raise UnknownRole(f'role must be one of {", ".join(ROLES)}')
    return role


def at_least(role, needed):
    """Whether ``role`` (None: nobody) is ``needed`` or above."""
    return role in ROLES and ROLES.index(role) >= ROLES.index(check(needed))


def may(role, action):
    """Whether ``role`` may take ``action`` (a key of :data:`ACTIONS`; ``KeyError`` otherwise)."""
    return at_least(role, ACTIONS[action][0])


def refusal(role, action):
    """Why ``role`` (None: nobody) may not take ``action``: "only operators and admins may ..."."""
    lowest, phrase = ACTIONS[action]
    allowed = ' and '.join(f'{r}s' for r in ROLES[ROLES.index(lowest):])
    you = f'you are {"an" if role[:1] in "aeiou" else "a"} {role}' if role else 'log in first'
    return f'only {allowed} may {phrase}; {you}'

