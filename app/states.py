"""Job states and the rules for what an operator may do in each."""

QUEUED = 'queued'
SCHEDULED = 'scheduled'
RUNNING = 'running'
RETRYING = 'retrying'
SUCCEEDED = 'succeeded'
FAILED = 'failed'
CANCELED = 'canceled'

# Display order: the life of a job, left to right.
JOB_STATES = (QUEUED, SCHEDULED, RUNNING, RETRYING, SUCCEEDED, FAILED, CANCELED)
FINISHED = frozenset({SUCCEEDED, FAILED, CANCELED})
# Waiting for a worker: Huey still holds a message for these.
WAITING = frozenset({QUEUED, SCHEDULED, RETRYING})

# Outcomes of one attempt (Attempt.outcome).
ATTEMPT_RUNNING = 'running'
ATTEMPT_SUCCEEDED = 'succeeded'
ATTEMPT_FAILED = 'failed'
ATTEMPT_TIMEOUT = 'timeout'
ATTEMPT_CANCELED = 'canceled'
ATTEMPT_INTERRUPTED = 'interrupted'
ATTEMPT_LOST = 'lost'
ATTEMPT_OUTCOMES = (ATTEMPT_RUNNING, ATTEMPT_SUCCEEDED, ATTEMPT_FAILED,
                    ATTEMPT_TIMEOUT, ATTEMPT_CANCELED, ATTEMPT_INTERRUPTED,
                    ATTEMPT_LOST)


class StateConflict(Exception):
    """An action the job's current state does not allow (HTTP 409)."""

    def __init__(self, action, state):
        self.action = action
        self.state = state
        super().__init__(f'cannot {action} a {state} job; {ALLOWED_TEXT[action]}')


# Which states allow each operator action.
ALLOWED = {
    # A new attempt of the same job, after it gave up or was stopped.
    'retry': frozenset({FAILED, CANCELED}),
    # Waiting jobs are withdrawn from Huey (a retrying job waits for its next
    # attempt); a running one is asked to stop at its next progress report.
    'cancel': frozenset({QUEUED, SCHEDULED, RUNNING, RETRYING}),
    # A job waiting for its time (or its retry delay) can go now.
    'run_now': frozenset({SCHEDULED, RETRYING}),
    # Only history may be deleted; live jobs are canceled first.
    'delete': FINISHED,
}
ALLOWED_TEXT = {
    action: 'only ' + ', '.join(s for s in JOB_STATES if s in states) + ' jobs can be'
            + {'retry': ' retried', 'cancel': ' canceled', 'delete': ' deleted',
               'run_now': ' run now'}[action]
    for action, states in ALLOWED.items()
}


def allows(state, action):
    """True when a job in ``state`` may be given ``action``."""
    return state in ALLOWED[action]


def check(state, action):
    """Raise :class:`StateConflict` unless ``state`` allows ``action``."""
    if not allows(state, action):
        raise StateConflict(action, state)
