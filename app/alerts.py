"""Alerts: the rules of ``ALERT_RULES`` evaluated by the leader, incidents kept in the ledger.

The leading consumer (:mod:`app.leader`; the embedded process always
leads) calls :func:`check` every ``ALERT_INTERVAL`` seconds on a thread of
its own, so a slow webhook never holds up the reaper. A pass:

1. **evaluates** every rule (:mod:`app.rules`) from cheap reads: jobs
   finished per minute from the kept rollups (:func:`app.queries.finished`),
   the broker's depth and consumer leases, and the oldest waiting job from
   two partial-index probes per queue (:func:`app.queries.oldest_waiting`);
   never a scan of the jobs;
2. **fires** a rule on a subject (a queue or a task) that crosses its
   threshold and has no firing :class:`~app.models.Alert` row, by writing
   one; the database allows one firing row per rule and subject, so an
   incident fires once, whichever leader sees it, and a new leader finds
   it in SQL rather than firing it again; **resolves** a firing row whose
   rule no longer holds (or that no rule watches any more);
3. **delivers** what is due to ``ALERT_WEBHOOK_URL``: one JSON post when an
   alert fires and one when it resolves, each with a timeout. The row is
   written first; a delivery that fails is counted on the row, with its
   reason, and tried again on the next pass (the rest wait for it, so a
   receiver that is down costs one timeout a pass).

Pages and the API read :func:`firing` and :func:`history`.
"""
import datetime as dt
import json
import logging
import urllib.error
import urllib.request
from typing import NamedTuple

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from . import broker, events, queries, rules, states
from .extensions import db
from .models import Alert, isoformat, utcnow

logger = logging.getLogger(__name__)

FIRING, RESOLVED = 'firing', 'resolved'
PENDING, SENT, OFF = 'pending', 'sent', 'off'  # an alert's delivery
DELIVERIES = 20  # alerts delivered per pass at most; the rest on the next
MAX_ERROR = 500  # characters of a failed delivery's reason kept
GONE = 'no rule watches it any more (ALERT_RULES changed)'


class Reading(NamedTuple):
    """What one rule sees on one subject: the value, whether it crosses, a sentence saying so."""
    subject: str
    value: float
    breached: bool
    text: str


class Outcome(NamedTuple):
    """What a pass of :func:`evaluate` changed: the alerts it fired and resolved (rows)."""
    fired: list
    resolved: list


def _over(rule):
    unit = {rules.FAILURE_RATE: '%', rules.OLDEST_WAITING: ' s'}.get(rule.kind, '')
    return '' if rule.kind == rules.NO_CONSUMER else f', over {rule.threshold:g}{unit}'


def _measure(rule, config, now, shared):
    """The :class:`Reading` of each of ``rule``'s subjects.

    ``shared`` keeps reads that several rules need, for one pass. Raises
    :class:`~app.broker.BrokerUnavailable` when the broker does not answer.
    """
    subjects = rule.subjects(config['QUEUES'])
    if rule.kind == rules.FAILURE_RATE:
        key = ('finished', rule.minutes, rule.scope)
        if key not in shared:
            shared[key] = queries.finished(now - dt.timedelta(minutes=rule.minutes),
                                           now + dt.timedelta(microseconds=1),
                                           (rule.scope, 'state'))
        counts = shared[key]
        readings = []
        for subject in subjects:
            failed = counts.get((subject, states.FAILED), 0)
            done = failed + counts.get((subject, states.SUCCEEDED), 0)
            rate = 100.0 * failed / done if done else 0.0
            readings.append(Reading(
                subject, rate, done >= rule.min_jobs and rate > rule.threshold,
                f'failure rate of {rule.scope} {subject} is {rate:.1f}% ({failed} of {done} '
                f'jobs failed in the last {rule.minutes} min)'))
        return readings
    if rule.kind == rules.OLDEST_WAITING:
        if 'oldest' not in shared:
            shared['oldest'] = queries.oldest_waiting(config['QUEUES'], now)
        return [Reading(q, shared['oldest'][q], shared['oldest'][q] > rule.threshold,
                        f'the oldest job waiting in queue {q} has waited '
                        f'{shared["oldest"][q]:.0f} s') for q in subjects]
    if rule.kind == rules.DEPTH:
        readings = []
        for q in subjects:
            ready = broker.depth(q)[0]
            readings.append(Reading(q, float(ready), ready > rule.threshold,
                                    f'queue {q} holds {ready} messages ready to run'))
        return readings
    readings = []  # no_consumer
    for q in subjects:
        online = sum(1 for alive in broker.consumers(q).values() if alive)
        readings.append(Reading(q, float(online), online == 0,
                                f'{online} consumer{"" if online == 1 else "s"} online '
                                f'for queue {q}'))
    return readings


def evaluate(config, now=None):
    """One evaluation of every rule in ``config['ALERT_RULES']``; an :class:`Outcome`.

    Fires (writes a firing row) or resolves each alert as its rule now
    reads, each change committed on its own, and announces them on the
    event channel. A rule whose reading needs the broker while it is
    unreachable is skipped (its alerts stay as they are). Raises what
    the database raises.
    """
    now = now or utcnow()
    webhook = bool(config['ALERT_WEBHOOK_URL'])
    open_ = {(a.rule, a.subject): a for a in db.session.scalars(
        sa.select(Alert).where(Alert.state == FIRING))}
    outcome = Outcome([], [])
    watched, shared = set(), {}
    for rule in config['ALERT_RULES']:
        try:
            readings = _measure(rule, config, now, shared)
        except broker.BrokerUnavailable as exc:
            logger.warning('alerts: rule %r not evaluated, the broker is unreachable (%s)',
                           rule.name, exc)
            watched.update((rule.name, s) for s in rule.subjects(config['QUEUES']))
            continue
        for reading in readings:
            key = (rule.name, reading.subject)
            watched.add(key)
            alert = open_.get(key)
            if reading.breached and alert is None:
                fired = _fire(rule, reading, now, webhook)
                if fired is not None:
                    outcome.fired.append(fired)
            elif not reading.breached and alert is not None:
                if _resolve(alert, now, reading.text, webhook):
                    outcome.resolved.append(alert)
    for key, alert in open_.items():
        if key not in watched and _resolve(alert, now, GONE, webhook):
            outcome.resolved.append(alert)
    for alert in outcome.fired:
        logger.warning('alert fired: %s: %s', alert.rule, alert.message)
    for alert in outcome.resolved:
        logger.warning('alert resolved: %s: %s', alert.rule, alert.resolution)
    if outcome.fired or outcome.resolved:
        events.publish(alerts=True)
    return outcome


def _fire(rule, reading, now, webhook):
    """Write the firing row of ``rule`` on ``reading``'s subject; None if one fires already."""
    alert = Alert(rule=rule.name, kind=rule.kind, scope=rule.scope, subject=reading.subject,
                  state=FIRING, fired_at=now, value=reading.value, threshold=rule.threshold,
                  message=reading.text + _over(rule), delivery=PENDING if webhook else OFF,
                  delivery_attempts=0)
    db.session.add(alert)
    try:
        db.session.commit()
    except IntegrityError:
        # Another leader's pass (a lead changing hands) wrote it first.
        db.session.rollback()
        return None
    return alert


def _resolve(alert, now, text, webhook):
    """Mark ``alert`` resolved (only if it still fires); whether it did."""
    done = db.session.execute(
        sa.update(Alert).where(Alert.id == alert.id, Alert.state == FIRING)
        .values(state=RESOLVED, resolved_at=now, resolution=text,
                delivery=PENDING if webhook else OFF)
        .execution_options(synchronize_session=False)).rowcount
    db.session.commit()
    db.session.refresh(alert)
    return bool(done)


# -- the webhook ---------------------------------------------------------------

def _slack(text):
    # Slack reads &, < and > in "text" as markup; these three are its escapes.
    return text.replace('&', '&amp;').replace('<', '&lt;').replace('>', '&gt;')


def payload(alert, status):
    """The JSON body (a dict) announcing that ``alert`` is ``status`` (``firing``, ``resolved``).

    ``text`` is a line for chat (Slack's incoming webhooks, and the
    services that copy them, show it as it is); ``status`` and ``alert``
    (the row as ``GET /api/alerts`` shows it, without its delivery) are
    for programs.
    """
    if status == FIRING:
        text = f'[FIRING] {alert.rule}: {alert.message}'
    else:
        text = (f'[RESOLVED] {alert.rule}: {alert.resolution} '
                f'(fired {isoformat(alert.fired_at)})')
    shown = {k: v for k, v in alert.to_dict().items()
             if k not in ('delivery', 'notified', 'delivered_at', 'delivery_attempts',
                          'delivery_error')}
    return {'text': _slack(text), 'status': status, 'alert': shown}


def post(url, body, timeout):
    """POST ``body`` as JSON to ``url``; None once it answered 2xx, else why not (a str).

    ``timeout``: seconds for the connection and for each read. The reason
    never holds the URL (a webhook's URL is its secret).
    """
    request = urllib.request.Request(
        url, data=json.dumps(body, ensure_ascii=False).encode(), method='POST',
        headers={'Content-Type': 'application/json', 'User-Agent': 'queue-manager'})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read(64 * 1024)
            return None if 200 <= response.status < 300 else f'HTTP {response.status}'
    except urllib.error.HTTPError as exc:
        return f'HTTP {exc.code} {exc.reason}'
    except urllib.error.URLError as exc:
        return f'unreachable: {exc.reason}'
    except (OSError, ValueError) as exc:  # a timeout while reading, a bad answer
        return f'{type(exc).__name__}: {exc}'


def deliver(config, send=post):
    """Post what is due to ``config['ALERT_WEBHOOK_URL']``; how many posts went out.

    For each alert with a delivery pending, oldest first (at most
    :data:`DELIVERIES`): its firing message if not yet sent, then its
    resolving one if it resolved. Each success is committed at once; the
    first failure is recorded on its row and ends the pass (the next pass
    tries again). ``send(url, body, timeout)`` returns None or the reason
    it failed (:func:`post`).
    """
    url = config['ALERT_WEBHOOK_URL']
    if not url:
        return 0
    sent = 0
    for alert in db.session.scalars(sa.select(Alert).where(Alert.delivery == PENDING)
                                    .order_by(Alert.id).limit(DELIVERIES)).all():
        while alert.notified != alert.state:
            status = FIRING if alert.notified is None else RESOLVED
            error = send(url, payload(alert, status), config['ALERT_WEBHOOK_TIMEOUT'])
            if error is not None:
                alert.delivery_attempts += 1
                alert.delivery_error = error[:MAX_ERROR]
                db.session.commit()
                logger.warning('alerts: webhook delivery of alert %d (%s) failed: %s; tried '
                               'again on the next evaluation', alert.id, status, error)
                return sent
            alert.notified, alert.delivered_at, alert.delivery_error = status, utcnow(), None
            db.session.commit()
            sent += 1
        alert.delivery = SENT
        db.session.commit()
    return sent


def check(app):
    """The leader's pass for ``app``: :func:`evaluate`, then :func:`deliver`. Never raises."""
    with app.app_context():
        try:
            evaluate(app.config)
            deliver(app.config)
        except Exception:
            db.session.rollback()
            logger.exception('alerts: pass failed; trying again on the next')
        finally:
            db.session.remove()


# -- reading -------------------------------------------------------------------

def firing():
    """The alerts firing now, newest first (rows)."""
    return db.session.scalars(sa.select(Alert).where(Alert.state == FIRING)
                              .order_by(Alert.id.desc())).all()


def history(limit=50, before=None, state=None):
    """Alerts newest first, at most ``limit``: only ids below ``before`` (paging), only ``state``."""
    stmt = sa.select(Alert).order_by(Alert.id.desc()).limit(limit)
    if before is not None:
        stmt = stmt.where(Alert.id < before)
    if state is not None:
        stmt = stmt.where(Alert.state == state)
    return db.session.scalars(stmt).all()


def prune(before, limit):
    """Delete up to ``limit`` incidents resolved before ``before`` (naive UTC) whose
    messages went out (or had nowhere to go), in the caller's transaction; return how many.
    The leader calls it with ``ALERT_RETENTION`` (:data:`app.reaper.PRUNE_BATCH` a
    pass); a firing
    incident, or one whose resolving message is still due, is kept."""
    gone = (sa.select(Alert.id).where(Alert.state == 'resolved', Alert.resolved_at < before,
                                      Alert.delivery != 'pending')
            .order_by(Alert.id).limit(limit))
    return db.session.execute(
        sa.delete(Alert).where(Alert.id.in_(gone.scalar_subquery()))
        .execution_options(synchronize_session=False)).rowcount
