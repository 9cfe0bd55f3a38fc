"""Periodic jobs: each tick starts exactly once, a new leader catches up, pauses hold.

Driven with a controlled clock (the timestamp Huey's scheduler would pass),
in-process on the embedded broker and a real ledger.
"""
import datetime as dt
import threading

import sqlalchemy as sa

from app import controls, periodic
from app.extensions import db
from app.models import Job
from helpers import wait_for


def at(text):
    return dt.datetime.fromisoformat(text)


def started(task=None):
    stmt = sa.select(Job.task, Job.idempotency_key).order_by(Job.created_at, Job.id)
    if task:
        stmt = stmt.where(Job.task == task)
    return [tuple(r) for r in db.session.execute(stmt)]


def test_a_due_tick_starts_its_job_once_however_often_it_is_seen(ctx):
    now = at('2026-01-01T05:00:30')
    periodic.launch_due(now, ctx.config)
    periodic.launch_due(now, ctx.config)
    controls.put(controls.PERIODIC_WATERMARK, None)  # as a second leader that knows nothing
    db.session.commit()
    periodic.launch_due(now, ctx.config)
    assert started() == [('report', 'periodic:report:2026-01-01T05:00Z')]


def test_a_new_leader_starts_the_ticks_missed_since_the_watermark(ctx):
    controls.put(controls.PERIODIC_WATERMARK, at('2026-01-01T02:58:00').isoformat())
    db.session.commit()
    periodic.launch_due(at('2026-01-01T03:01:10'), ctx.config)
    assert sorted(started()) == [('purge', 'periodic:purge:2026-01-01T03:00Z'),
                                 ('report', 'periodic:report:2026-01-01T03:00Z')]
    assert controls.get(controls.PERIODIC_WATERMARK) == '2026-01-01T03:01:00'


def test_catching_up_looks_back_no_further_than_the_configured_window(ctx):
    ctx.config['PERIODIC_CATCH_UP'] = 300
    controls.put(controls.PERIODIC_WATERMARK, at('2026-01-01T01:00:00').isoformat())
    db.session.commit()
    periodic.launch_due(at('2026-01-01T05:02:00'), ctx.config)
    assert started() == [('report', 'periodic:report:2026-01-01T05:00Z')]


def test_a_paused_periodic_task_is_not_started(ctx):
    periodic.pause('report')
    periodic.launch_due(at('2026-01-01T05:00:30'), ctx.config)
    assert started('report') == []
    periodic.resume('report')
    periodic.launch_due(at('2026-01-01T06:00:30'), ctx.config)
    assert started('report') == [('report', 'periodic:report:2026-01-01T06:00Z')]


def keys(app):
    with app.app_context():
        try:
            return [k for _t, k in started()]
        finally:
            db.session.remove()


def test_a_deployment_can_start_no_periodic_task(app):
    launcher = periodic.Launcher(app, lambda: True)
    launcher.tick(at('2026-01-01T07:00:05'))
    assert launcher.step() == [] and keys(app) == []


def test_the_launcher_starts_ticks_only_while_leading(app):
    app.config['PERIODIC'] = 1
    leading = threading.Event()
    launcher = periodic.Launcher(app, leading.is_set)
    launcher.tick(at('2026-01-01T07:00:05'))
    assert launcher.step() == [] and keys(app) == []
    leading.set()
    launcher.tick(at('2026-01-01T08:00:05'))
    assert len(launcher.step()) == 1
    assert keys(app) == ['periodic:report:2026-01-01T08:00Z']


def test_the_launcher_thread_wakes_on_the_scheduler_tick(app):
    app.config['PERIODIC'] = 1
    launcher = periodic.Launcher(app, lambda: True)
    stop = threading.Event()
    thread = threading.Thread(target=launcher.run, args=(stop,), daemon=True)
    thread.start()
    try:
        launcher.tick(at('2026-01-01T09:00:05'))
        assert wait_for(lambda: keys(app), 10, message='the tick to start a job') == [
            'periodic:report:2026-01-01T09:00Z']
    finally:
        stop.set()
        launcher.poke()
        thread.join(5)


def test_running_it_now_is_not_a_tick(ctx):
    first = periodic.trigger('report', ctx.config)
    second = periodic.trigger('report', ctx.config)
    assert first.id != second.id and first.idempotency_key is None
