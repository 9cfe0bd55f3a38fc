"""deploy/kubernetes/: every manifest valid, offline, and in step with the code it runs.

Built-in kinds are checked against the Kubernetes schemas that the
kubernetes-validate package ships (strict: an unknown field is an error).
KEDA's ScaledObject is a custom resource those schemas lack: it is checked
against tests/keda_scaledobject.schema.json, written from KEDA's
specification. No test here reaches the network.
"""
import json
import re
import runpy
import shutil
import socket
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import schema_contents
from referencing import Registry, Resource

from app import config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / 'deploy' / 'kubernetes'
KUBERNETES_VERSION = '1.33'
KEDA_SCHEMA = Path(__file__).with_name('keda_scaledobject.schema.json')
SCALING = ('worker-keda.yaml', 'worker-hpa.yaml')  # one or the other, not in the base
# Variables the manifests may set that app/config.py does not read: the queue
# a consumer serves (app/consumer.py), the first admin's password (flask
# users ensure-admin) and the scrape token of /metrics.
READ_ELSEWHERE = {'QUEUE', 'ADMIN_PASSWORD', 'METRICS_TOKEN'}
SECRETS = {'SECRET_KEY', 'DATABASE_URL', 'METRICS_TOKEN', 'ADMIN_PASSWORD'}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Any attempt to open a connection fails the test: validation must need no network."""
    def refuse(*args, **kwargs):
        raise AssertionError(f'a network connection was attempted: {args!r}')
    monkeypatch.setattr(socket.socket, 'connect', refuse)
    monkeypatch.setattr(socket, 'create_connection', refuse)
    monkeypatch.setattr(socket, 'getaddrinfo', refuse)


def manifests(directory=DEPLOY):
    """``[(file name, document)]`` of every Kubernetes object under ``directory``."""
    found = []
    for path in sorted(directory.glob('*.yaml')):
        if path.name == 'kustomization.yaml':
            continue
        found.extend((path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc)
    return found


def _definitions():
    return schema_contents(f'kubernetes-json-schema/v{KUBERNETES_VERSION}.0-local-strict/'
                           f'_definitions.json', KUBERNETES_VERSION)


def validate(doc):
    """Raise ``jsonschema.ValidationError`` (or kubernetes-validate's) if ``doc`` is not valid."""
    if str(doc.get('apiVersion', '')).startswith('keda.sh/'):
        registry = Resource.from_contents(_definitions()) @ Registry()
        jsonschema.Draft202012Validator(json.loads(KEDA_SCHEMA.read_text()),
                                        registry=registry).validate(doc)
    else:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def problems(directory=DEPLOY):
    """``[(file name, kind, message)]`` for every manifest under ``directory`` that fails."""
    found = []
    for name, doc in manifests(directory):
        try:
            validate(doc)
        except (jsonschema.ValidationError, kubernetes_validate.SchemaNotFoundError) as exc:
            path = '.'.join(str(p) for p in getattr(exc, 'path', ()))
            found.append((name, doc.get('kind'), f'{path}: {exc.message}'))
    return found


def one(kind, name=None):
    """The one manifest of ``kind`` (and ``name``)."""
    [doc] = [d for _f, d in manifests()
             if d['kind'] == kind and (name is None or d['metadata']['name'] == name)]
    return doc


def container(deployment):
    [c] = deployment['spec']['template']['spec']['containers']
    return c


WEB = 'queue-manager-web'
WORKER = 'queue-manager-worker'


def test_every_manifest_validates_offline():
    kinds = sorted(d['kind'] for _f, d in manifests())
    assert kinds == ['ConfigMap', 'Deployment', 'Deployment', 'HorizontalPodAutoscaler', 'Job',
                     'ScaledObject', 'Secret', 'Service']
    assert problems() == []


# What is changed in a copy of the manifests, and what the validation must say.
BREAKAGES = {
    'a number that is not one': ('web.yaml', 'replicas: 2', 'replicas: two',
                                 "spec.replicas: 'two' is not of type 'integer'"),
    'a misspelt field': ('worker.yaml', '          command: ["huey_consumer"',
                         '          comand: ["huey_consumer"', "('comand' was unexpected)"),
    'the wrong type': ('migrate-job.yaml', 'backoffLimit: 4', 'backoffLimit: "four"',
                       "spec.backoffLimit: 'four' is not of type 'integer'"),
    "autoscaling/v1 (it has no metrics)": ('worker-hpa.yaml', 'apiVersion: autoscaling/v2',
                                           'apiVersion: autoscaling/v1', "'metrics' were unexpected"),
    'a KEDA threshold unquoted': ('worker-keda.yaml', 'threshold: "20"', 'threshold: 20',
                                  "metadata.threshold: 20 is not of type 'string'"),
    "the HPA's field name in a ScaledObject": ('worker-keda.yaml', '  minReplicaCount: 1',
                                               '  minReplicas: 1', "('minReplicas' was unexpected)"),
    'a prometheus trigger without its query': (
        'worker-keda.yaml', '        query: max(', '        querry: max(',
        "'query' is a required property"),
    'a kind no schema knows': ('secret.yaml', 'kind: Secret', 'kind: Secrets',
                               "Couldn't find schema for kind Secrets"),
}


@pytest.mark.parametrize('breakage', BREAKAGES, ids=list(BREAKAGES))
def test_a_broken_copy_of_the_manifests_fails(tmp_path, breakage):
    file_name, old, new, said = BREAKAGES[breakage]
    copy = tmp_path / 'kubernetes'
    shutil.copytree(DEPLOY, copy)
    path = copy / file_name
    text = path.read_text()
    assert text.count(old) == 1, f'{old!r} is no longer in {file_name}: update this test'
    path.write_text(text.replace(old, new))
    [(found_in, _kind, message)] = problems(copy)
    assert found_in == file_name and said in message, message


def test_the_kustomization_lists_every_manifest_and_offers_both_scalers():
    kustomization = yaml.safe_load((DEPLOY / 'kustomization.yaml').read_text())
    offered = re.findall(r'^\s*#\s*-\s*(\S+\.yaml)', (DEPLOY / 'kustomization.yaml').read_text(),
                         re.M)
    assert sorted(offered) == sorted(SCALING)
    files = {p.name for p in DEPLOY.glob('*.yaml')} - {'kustomization.yaml'}
    assert set(kustomization['resources']) == files - set(SCALING)
    # Every manifest names the image the kustomization replaces.
    [image] = kustomization['images']
    for _f, doc in manifests():
        spec = doc.get('spec', {}).get('template', {}).get('spec', {})
        for c in spec.get('containers', []):
            assert c['image'] == image['name'], (doc['metadata']['name'], c['image'])


def _environment():
    """Every variable the manifests give a container: ``{name: value}`` and its sources."""
    configmap, secret = one('ConfigMap'), one('Secret')
    env = {**configmap['data'], **secret['stringData']}
    for _f, doc in manifests():
        spec = doc.get('spec', {}).get('template', {}).get('spec', {})
        for c in spec.get('containers', []):
            assert {ref.get('configMapRef', ref.get('secretRef'))['name']
                    for ref in c['envFrom']} == {configmap['metadata']['name'],
                                                 secret['metadata']['name']}
            env.update({e['name']: e['value'] for e in c.get('env', [])})
    return env


def test_every_variable_the_manifests_set_is_a_setting_the_app_reads():
    env = _environment()
    assert set(env) - set(config.DEFAULTS) - READ_ELSEWHERE == set()
    # The values parse as the app parses them, and pick the distributed mode.
    loaded = config.load(environ=env)
    assert loaded['EMBEDDED'] is False
    assert loaded['DATABASE_URL'].startswith('postgresql+psycopg://')
    assert container(one('Deployment', WORKER))['env'] == [{'name': 'QUEUE', 'value': 'default'}]
    assert 'default' in loaded['QUEUES']


def test_the_secret_holds_placeholders_only():
    secret = one('Secret')
    assert set(secret['stringData']) == SECRETS and 'data' not in secret
    for key, value in secret['stringData'].items():
        assert 'change-me' in value, f'{key} looks like a real value'


def _compose():
    return yaml.safe_load((ROOT / 'docker-compose.yml').read_text())


def _dockerfile(instruction):
    lines = [line for line in (ROOT / 'Dockerfile').read_text().splitlines()
             if line.startswith(instruction + ' ')]
    return lines[-1][len(instruction) + 1:]


def test_commands_are_those_of_the_dockerfile_and_compose():
    services = _compose()['services']
    assert container(one('Deployment', WEB))['command'] == json.loads(_dockerfile('CMD'))
    assert container(one('Deployment', WORKER))['command'] == services['worker']['command']
    [job] = one('Job')['spec']['template']['spec']['containers']
    shell, flag, script = job['command']
    assert (shell, flag) == ('sh', '-c')
    assert script.split(' && ') == [' '.join(services['migrate']['command']),
                                    'flask --app wsgi users ensure-admin']


def test_ports_and_probes_are_those_the_web_app_serves(app):
    web = container(one('Deployment', WEB))
    [port] = web['ports']
    exposed = int(_dockerfile('EXPOSE'))
    env = {e['name']: e['value'] for e in web['env']}
    assert port['containerPort'] == exposed == int(env['PORT']) == config.DEFAULTS['PORT']
    assert env['HOST'] == '0.0.0.0' and 'HOST=0.0.0.0' in (ROOT / 'Dockerfile').read_text()
    [service_port] = one('Service')['spec']['ports']
    assert service_port['targetPort'] == port['name']
    client = app.test_client()
    for probe in ('readinessProbe', 'livenessProbe'):
        check = web[probe]['httpGet']
        assert check['port'] == port['name']
        # A route of the app, open without credentials (probes send none).
        assert app.url_map.bind('localhost').match(check['path']) == ('health.healthz', {})
        response = client.get(check['path'])
        assert response.status_code == 200 and response.get_json()['status'] == 'ok'


def test_grace_periods_outlast_the_processes_own(monkeypatch):
    env = _environment()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    grace = config.load(environ=env)['GRACE_PERIOD']
    worker = one('Deployment', WORKER)['spec']['template']['spec']
    compose = _compose()['x-app']['stop_grace_period']
    assert worker['terminationGracePeriodSeconds'] > grace
    assert f"{worker['terminationGracePeriodSeconds']}s" == compose
    # The web pod: its preStop pause, then gunicorn's own graceful stop.
    web = one('Deployment', WEB)['spec']['template']['spec']
    graceful = runpy.run_path(str(ROOT / 'gunicorn.conf.py'))['graceful_timeout']
    pause = int(web['containers'][0]['lifecycle']['preStop']['exec']['command'][1])
    assert web['terminationGracePeriodSeconds'] >= pause + graceful


def test_selectors_and_scalers_name_what_exists():
    deployments = {d['metadata']['name']: d for _f, d in manifests() if d['kind'] == 'Deployment'}
    assert set(deployments) == {WEB, WORKER}
    for d in deployments.values():
        labels = d['spec']['template']['metadata']['labels']
        assert d['spec']['selector']['matchLabels'].items() <= labels.items()
    selector = one('Service')['spec']['selector'].items()
    assert selector <= deployments[WEB]['spec']['template']['metadata']['labels'].items()
    assert not selector <= deployments[WORKER]['spec']['template']['metadata']['labels'].items()

    queue = container(deployments[WORKER])['env'][0]['value']
    hpa, keda = one('HorizontalPodAutoscaler'), one('ScaledObject')
    assert hpa['spec']['scaleTargetRef'] == {'apiVersion': 'apps/v1', 'kind': 'Deployment',
                                             'name': WORKER}
    assert keda['spec']['scaleTargetRef'] == {'name': WORKER}  # a Deployment by default
    [metric] = hpa['spec']['metrics']
    assert metric['type'] == 'External'
    assert metric['external']['metric'] == {'name': 'queue_manager_queue_depth',
                                            'selector': {'matchLabels': {'queue': queue}}}
    [trigger] = keda['spec']['triggers']
    assert trigger['type'] == 'prometheus'
    assert trigger['metadata']['query'] == f'max(queue_manager_queue_depth{{queue="{queue}"}})'
    # Never scaled to zero: the leading consumer runs the reaper and periodic tasks.
    assert hpa['spec']['minReplicas'] >= 1 and keda['spec']['minReplicaCount'] >= 1
    assert keda['spec']['maxReplicaCount'] == hpa['spec']['maxReplicas']
    assert trigger['metadata']['threshold'] == metric['external']['target']['averageValue']
