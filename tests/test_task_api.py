"""What a task calls: progress, current, checkpoint."""
import pytest
from huey.api import Task

from app import task_api


class FakeStorage:
    """Huey storage's flag calls only: a boundary, not the thing tested."""

    def __init__(self, flags=()):
        self.flags = set(flags)

    def has_data_for_key(self, key):
        return key in self.flags

    def delete_data(self, key):
        self.flags.discard(key)


class FakeHuey:
    def __init__(self, flags=()):
        self.storage = FakeStorage(flags)
        self.on_progress = self.on_log = None


def test_outside_a_job_reports_go_nowhere_and_current_is_none():
    assert task_api.current() is None
    task_api.progress(1, 2)  # no job, no sink: nothing happens
    task_api.checkpoint()


def test_progress_is_a_bounded_fraction_with_storable_text_handed_to_the_hueys_slot():
    seen = []
    huey = FakeHuey()
    huey.on_progress = lambda job, fraction, text: seen.append((fraction, text))
    with task_api.running(Task(id='j1'), huey, attempt=2) as job:
        assert (task_api.current().job_id, task_api.current().attempt) == ('j1', 2)
        task_api.progress(3, 4, 'three \ud800')
        task_api.progress(5)  # a fraction, past 1
    assert seen == [(0.75, 'three \\ud800'), (1.0, None)]
    assert job.fraction == 1.0 and task_api.current() is None


def test_a_cancel_request_stops_the_task_at_its_next_report_once():
    task = Task(id='j2')
    huey = FakeHuey({task_api.CANCEL_KEY.format('j2')})
    with task_api.running(task, huey):
        task_api.current().checked -= task_api.CANCEL_CHECK  # due for a look
        with pytest.raises(task_api.Canceled, match='canceled by an operator at 50%'):
            task_api.progress(1, 2)
        assert huey.storage.flags == set()  # taken: it is not raised twice
