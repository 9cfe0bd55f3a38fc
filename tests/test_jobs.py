"""Job commands: one guarded update, and a cancel the broker did not hear undone."""
import pytest

from app import broker, catalog, jobs, states
from app.extensions import db
from app.models import Job


def submit(app, **options):
    return jobs.submit(catalog.validate({'task': 'noop', 'params': {}, **options}, app.config))


def test_a_change_moves_the_version_on_and_misses_a_row_changed_meanwhile(ctx):
    job = submit(ctx)
    seen = job.version
    assert jobs.change(Job.id == job.id, Job.version == seen, priority=5) == 1
    assert jobs.change(Job.id == job.id, Job.version == seen, priority=9) == 0  # stale guard
    db.session.commit()
    db.session.refresh(job)
    assert (job.priority, job.version) == (5, seen + 1)
    rows = jobs.change(Job.id == job.id, priority=7, returning=(Job.id, Job.priority))
    assert [tuple(r) for r in rows] == [(job.id, 7)]


@pytest.mark.parametrize('bulk', [False, True])
def test_a_cancel_the_broker_does_not_hear_leaves_the_job_waiting(ctx, monkeypatch, bulk):
    waiting = submit(ctx, delay=3600)
    assert waiting.state == states.SCHEDULED
    version = waiting.version

    def down(*args):
        raise broker.BrokerUnavailable('down')
    monkeypatch.setattr(broker, 'withdraw', down)
    monkeypatch.setattr(broker, 'withdraw_many', down)
    with pytest.raises(broker.BrokerUnavailable):
        if bulk:
            jobs.bulk('cancel', ids=[waiting.id])
        else:
            jobs.cancel(waiting.id)
    db.session.expire_all()
    row = db.session.get(Job, waiting.id)
    assert (row.state, row.finished_at) == (states.SCHEDULED, None)
    assert row.version == version + 2  # canceled, then put back: two changes
