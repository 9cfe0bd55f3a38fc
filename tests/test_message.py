"""The Huey message format: our header, and the attempt bookkeeping in ``meta``."""
from huey.api import Task

from app import message


def test_a_header_names_the_job_and_its_priority_and_splits_back():
    data = message.header('91784126-a10d-4542-8edc-a97a21705b81', 7) + b'body'
    assert message.split(data) == (('91784126-a10d-4542-8edc-a97a21705b81', 7), b'body')
    assert message.job_id(data) == '91784126-a10d-4542-8edc-a97a21705b81'


def test_ids_that_cannot_go_in_a_header_get_none_and_the_message_is_all_body():
    for odd in ('has space', 'x' * 65, None, 'é'):
        assert message.header(odd, 1) == b''
    for raw in (b'plain pickle', b'qm1 broken', b'qm1 id notanumber\nbody'):
        assert message.split(raw) == ((None, 0), raw)


def test_attempt_numbers_count_earlier_attempts_and_retries_used():
    task = Task((), message.kwargs({'n': 1}, base=2, retries=3), retries=3)
    assert (message.params(task), message.retries(task)) == ({'n': 1}, 3)
    assert message.attempt_number(task) == 3  # two before it, no retry used yet
    task.retries = 1  # Huey counts down as it retries
    assert message.attempt_number(task) == 5


def test_again_runs_the_same_job_as_its_next_attempt():
    task = Task((), message.kwargs({'n': 1}, base=0, retries=2), id='j1', retries=1,
                retry_delay=5, priority=3)
    again = message.again(task, base=4)
    assert (again.id, again.retries, again.retry_delay, again.priority) == ('j1', 1, 5, 3)
    assert message.attempt_number(again) == 5
    assert message.params(again) == {'n': 1}


def test_a_message_of_an_older_version_without_meta_counts_from_huey():
    task = Task((), {'params': {}}, retries=2)
    assert message.attempt_number(task) == 1


def test_a_message_without_our_meta_reads_as_a_first_message():
    bare = Task((), {'params': {'n': 1}})
    odd = Task((), {'params': {'n': 1}, 'meta': 'not a dict'})
    for task in (bare, odd):
        assert (message.params(task), message.base(task), message.retries(task)) == (
            {'n': 1}, 0, task.retries)
        assert message.attempt_number(task) == 1
    ours = Task((), message.kwargs({'n': 1}, 2, 3), retries=1)
    assert (message.base(ours), message.retries(ours), message.attempt_number(ours)) == (2, 3, 5)
