"""Queues: their overview, pausing and resuming."""
import pytest
from werkzeug.exceptions import NotFound

from app import broker, catalog, controls, jobs, queues


def submit(app, task='noop', **options):
    return jobs.submit(catalog.validate({'task': task, 'params': {}, **options}, app.config)).orm()


def test_the_overview_counts_each_queue_from_the_ledger_and_the_broker(ctx):
    app = ctx
    submit(app)
    submit(app, delay=3600)
    [default] = queues.overview(app.config)
    assert (default['name'], default['paused'], default['queued'], default['scheduled']) == (
        'default', False, 1, 1)
    assert (default['depth'], default['scheduled_messages']) == (1, 1)


def test_pause_and_resume_are_kept_in_the_ledger_and_reported(ctx):
    app = ctx
    assert queues.pause(app.config, 'default')['paused'] is True
    assert controls.paused_queues() == {'default'}
    assert queues.resume(app.config, 'default')['paused'] is False
    assert controls.paused_queues() == set()


def test_an_unknown_queue_is_not_found(ctx):
    with pytest.raises(NotFound):
        queues.pause(ctx.config, 'nope')


def test_a_broker_that_does_not_answer_leaves_depth_unknown(ctx, monkeypatch):
    def down(queue):
        raise broker.BrokerUnavailable('down')
    monkeypatch.setattr(broker, 'depth', down)
    [default] = queues.overview(ctx.config)
    assert default['depth'] is None and default['scheduled_messages'] is None
