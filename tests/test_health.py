"""GET /healthz: the broker and the database answer, or a 503 saying which did not."""
from app import broker


def test_healthy_in_the_embedded_mode(client):
    resp = client.get('/healthz')
    assert resp.status_code == 200
    assert resp.get_json() == {'status': 'ok', 'broker': 'ok', 'database': 'ok',
                               'broker_kind': 'sqlite (embedded)'}


def test_a_broker_that_does_not_answer_is_a_503_naming_it(client, monkeypatch):
    def down():
        raise broker.BrokerUnavailable('connection refused')
    monkeypatch.setattr(broker, 'ping', down)
    resp = client.get('/healthz')
    assert resp.status_code == 503
    assert resp.get_json()['broker'] == 'unreachable: connection refused'
    assert resp.get_json()['status'] == 'unavailable'
