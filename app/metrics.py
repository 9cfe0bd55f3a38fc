"""``/metrics`` in the Prometheus text format, built anew for each scrape from shared state.

Nothing is counted in the web process: every value is read at scrape time
from what every process shares (the ledger's counters and metric totals,
the broker's queues, leases and liveness notes), through a custom
collector in a fresh registry. So any web process on any host answers
the same, however many gunicorn workers there are. The names are listed in
the README ("Metrics"); other tools build on them, so they do not change.
"""
import concurrent.futures
import logging
import time

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from . import broker, queries, states
from .models import RUN, TIMING_BUCKETS, WAIT, utcnow

logger = logging.getLogger(__name__)

PREFIX = 'queue_manager_'
# Seconds a scrape waits for the broker's answers. A broker that hangs
# (rather than refusing) would otherwise hold the scrape for the client's
# socket timeout, past Prometheus's default scrape_timeout of 10 s, and the
# ledger's metrics would be lost with it.
BROKER_DEADLINE = 3.0
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
COMPONENTS = ('scheduler', 'reaper', 'ledger_writer')
# Outcomes of queue_manager_jobs_finished_total, each always exposed.
FINISHED_OUTCOMES = (states.SUCCEEDED, states.FAILED, states.CANCELED)


def component_health(config, now=None, seen=None):
    """``{component: (up, last seen as Unix seconds or None)}`` for :data:`COMPONENTS`.

    The scheduler and the reaper note in the broker when they last did their
    work (:func:`app.broker.mark_seen`): the scheduler every few seconds
    (any consumer's; each runs one), the reaper after each of the leader's
    passes. The ledger writer is seen through the consumer heartbeats it
    writes (the newest of a consumer still running). A component is up
    when it was seen within ``LOST_AFTER`` seconds (the reaper: three
    ``REAP_INTERVAL`` s, the leader's lease, if longer). Raises
    :class:`~app.broker.BrokerUnavailable`. ``seen`` is
    :func:`app.broker.components_seen`'s answer when already read.
    """
    now = time.time() if now is None else now
    seen = dict(broker.components_seen() if seen is None else seen)
    lost_after = config['LOST_AFTER']
    limits = {'scheduler': lost_after, 'reaper': max(lost_after, 3 * config['REAP_INTERVAL']),
              'ledger_writer': lost_after}
    beats = [w.last_seen for w in queries.workers(lost_after) if w.stopped_at is None]
    if beats:
        newest = max(beats)
        seen['ledger_writer'] = time.time() - (utcnow() - newest).total_seconds()
    return {name: (seen.get(name) is not None and now - seen[name] <= limits[name],
                   seen.get(name)) for name in COMPONENTS}


def broker_reads(queues, deadline=BROKER_DEADLINE):
    """``(depths, consumers online, components seen)`` per queue from the broker, or None.

    ``depths`` and ``consumers online`` are ``{queue: n}``; the third is
    :func:`app.broker.components_seen`'s answer. None when the broker
    refuses (:class:`~app.broker.BrokerUnavailable`) or has not answered
    within ``deadline`` seconds: the reads run on a thread of their own,
    left to end at the client's socket timeout.
    """
    def read():
        return ({queue: broker.depth(queue)[0] for queue in queues},
                {queue: sum(broker.consumers(queue).values()) for queue in queues},
                broker.components_seen())
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix='metrics-broker')
    try:
        return pool.submit(read).result(timeout=deadline)
    except broker.BrokerUnavailable:
        return None
    except concurrent.futures.TimeoutError:
        logger.warning('metrics: the broker did not answer within %.1f s; its metrics are '
                       'left out of this scrape', deadline)
        return None
    finally:
        pool.shutdown(wait=False)


class Collector:
    """A Prometheus collector reading the deployment's state when it is collected.

    ``config`` is the app's configuration (its queues, ``LOST_AFTER``...);
    :meth:`collect` must run in an app context. When the broker does not
    answer, the metrics read from it (depth, consumers, the scheduler's and
    reaper's health) are left out rather than guessed.
    """

    def __init__(self, config):
        self.config = config

    def collect(self):
        config = self.config
        queues = list(config['QUEUES'])
        counts = queries.stats()['queues']
        jobs = GaugeMetricFamily(PREFIX + 'jobs', 'Jobs in the ledger, by queue and state.',
                                 labels=['queue', 'state'])
        for queue in sorted(set(queues) | set(counts)):
            for state in states.JOB_STATES:
                jobs.add_metric([queue, state], counts.get(queue, {}).get(state, 0))
        yield jobs

        finished = CounterMetricFamily(
            PREFIX + 'jobs_finished', 'Jobs ended by an attempt, by queue, task and outcome '
            '(succeeded, failed, canceled); never decreases.', labels=['queue', 'task', 'outcome'])
        totals = queries.finished_totals()
        for queue, task in sorted({(q, t) for q, t, _o in totals}):
            for outcome in FINISHED_OUTCOMES:
                finished.add_metric([queue, task, outcome], totals.get((queue, task, outcome), 0))
        yield finished

        for timing, name, doc in (
                (RUN, 'job_run_seconds', 'Run time of attempts (their duration), seconds.'),
                (WAIT, 'job_wait_seconds', 'Wait time of attempts, from when their job became '
                                           'due (enqueued, or its scheduled or retry time) to '
                                           'their start, seconds.')):
            family = HistogramMetricFamily(PREFIX + name, doc, labels=['queue', 'task'])
            for (queue, task), (per_bucket, seconds) in sorted(queries.timing_totals(timing).items()):
                cumulative, buckets = 0, []
                for bound, n in zip((*map(repr, TIMING_BUCKETS), '+Inf'), per_bucket):
                    cumulative += n
                    buckets.append((bound, cumulative))
                family.add_metric([queue, task], buckets, seconds)
            yield family

        oldest = queries.oldest_waiting(queues)
        waiting = GaugeMetricFamily(PREFIX + 'oldest_waiting_seconds',
                                    'Age of the job that has waited longest to run (due, not '
                                    'started), seconds; 0 when none waits.', labels=['queue'])
        for queue in sorted(oldest):
            waiting.add_metric([queue], oldest[queue])
        yield waiting

        read = broker_reads(queues)
        if read is None:
            return
        depths, online, seen = read
        health = component_health(config, seen=seen)
        depth = GaugeMetricFamily(PREFIX + 'queue_depth', 'Messages the broker holds for the '
                                  'queue, ready to run.', labels=['queue'])
        consumers = GaugeMetricFamily(PREFIX + 'consumers', 'Consumers online for the queue '
                                      '(holding a current lease).', labels=['queue'])
        for queue in queues:
            depth.add_metric([queue], depths[queue])
            consumers.add_metric([queue], online[queue])
        yield depth
        yield consumers
        up = GaugeMetricFamily(PREFIX + 'component_up', '1 when the component was seen at work '
                               'lately, else 0.', labels=['component'])
        seen = GaugeMetricFamily(PREFIX + 'component_last_seen_seconds', 'When the component '
                                 'was last seen at work, Unix seconds.', labels=['component'])
        for name in COMPONENTS:
            is_up, at = health[name]
            up.add_metric([name], 1 if is_up else 0)
            if at is not None:
                seen.add_metric([name], at)
        yield up
        yield seen


def exposition(config):
    """The metrics as Prometheus text format 0.0.4 (bytes), read now; in an app context.

    Raises what the ledger's driver raises when the database does not answer.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(config))
    return generate_latest(registry)
