"""The fragment registry: every live fragment renders its id, and nothing else writes one.

A live update finds its target by DOM id, so an id written in two places
that drift apart breaks updates silently. These tests fail instead: each
registered fragment must render a root element carrying its id (alone, in
its page, and over a live view), and no template or module but the
registry may write a fragment id or name a fragment template.
"""
import ast
import re
from pathlib import Path

import pytest

from app import fragments, live
from app.extensions import db
from app.fragments import FRAGMENTS, PAGES, Scope
from app.models import Job

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / 'templates'
URLS = {'dashboard': '/', 'jobs': '/jobs', 'job': '/jobs/{id}', 'queues': '/queues',
        'workers': '/workers', 'failures': '/failures', 'scheduled': '/scheduled',
        'periodic': '/periodic', 'audit': '/audit', 'alerts': '/alerts',
        'queue': '/queues/default', 'task': '/tasks/noop'}
ROOT_ID = re.compile(r'\s*<[a-z]+\b[^>]*?\sid="([^"]*)"')
JINJA = re.compile(r'\{\{.*?\}\}|\{%.*?%\}', re.S)


def root_id(html):
    """The id of the first element in ``html`` (None if it has none)."""
    match = ROOT_ID.match(html)
    return match and match.group(1)


def pattern(fragment):
    """A regex matching the fragment's id, a parameter matching anything (even a placeholder)."""
    parts = re.split(r'\{\w+\}', fragment.id)
    return re.compile('^#?' + '.+'.join(map(re.escape, parts)) + '$')


ARGS = {'queue': {'queue': 'default'}, 'task': {'task': 'noop'}}


def params_for(page, job_id):
    return page.parse({'id': job_id} if page.name == 'job' else ARGS.get(page.name, {}))


@pytest.fixture
def job_id(client):
    return client.post('/api/jobs', json={'task': 'noop'}).get_json()['id']


def test_every_page_is_served_with_its_fragments_and_its_socket(client, job_id):
    assert set(URLS) == set(PAGES)
    for name, page in PAGES.items():
        params = params_for(page, job_id)
        html = client.get(URLS[name].format(id=job_id)).get_data(as_text=True)
        for fragment in page.fragments.values():
            dom_id = fragment.dom_id(params)
            assert html.count(f' id="{dom_id}"') == 1, (name, dom_id)
        assert f'hx-ws:connect="/ws?view={name}' in html, name
        status = fragments.LIVE_STATUS.dom_id({})
        assert f'<span id="{status}"' in html and f'data-status="{status}"' in html, name


def test_every_fragment_renders_a_root_element_with_its_id(app, job_id):
    rendered = set()
    for page in PAGES.values():
        params = params_for(page, job_id)
        with app.test_request_context():
            scope = Scope(params)
            for fragment in page.fragments.values():
                assert root_id(fragment.render(scope)) == fragment.dom_id(params), fragment
                rendered.add(fragment)
    with app.test_request_context():
        status = fragments.LIVE_STATUS
        assert root_id(status.render(live=True, node='n')) == status.dom_id({})
    assert rendered | {fragments.LIVE_STATUS} == set(FRAGMENTS)


def test_every_live_view_pushes_each_fragment_onto_its_id(app, job_id):
    for page in PAGES.values():
        args = {'view': page.name, **({'id': job_id} if page.name == 'job' else {}),
                **ARGS.get(page.name, {})}
        with app.test_request_context('/ws', query_string=args) as ctx:
            key, factory = live.view_for(args, app.config)
            html = factory(key, ctx.request.environ).render_html()
        for fragment in page.fragments.values():
            dom_id = fragment.dom_id(params_for(page, job_id))
            head = f'<hx-partial hx-target="#{dom_id}" hx-swap="outerHTML">'
            assert head in html, (page.name, dom_id)
            assert root_id(html.split(head, 1)[1]) == dom_id, (page.name, dom_id)


def test_a_deleted_job_shows_its_gone_summary_on_its_own_id(app, job_id):
    with app.app_context():
        db.session.delete(db.session.get(Job, job_id))
        db.session.commit()
    args = {'view': 'job', 'id': job_id}
    with app.test_request_context('/ws', query_string=args) as ctx:
        key, factory = live.view_for(args, app.config)
        html = factory(key, ctx.request.environ).render_html()
    summary = fragments.JOB_SUMMARY.dom_id({'id': job_id})
    assert html.startswith(f'<hx-partial hx-target="#{summary}"')
    assert root_id(html.split('>', 1)[1]) == summary and 'data-state="deleted"' in html
    assert fragments.JOB_ATTEMPTS.dom_id({'id': job_id}) not in html


def _includes(name):
    return re.findall(r"{%\s*include\s+'([^']+)'", (TEMPLATES / name).read_text())


def test_only_registered_fragments_render_a_fragment_id():
    own = {f.template for f in FRAGMENTS} | {f.gone_template for f in FRAGMENTS if f.gone}
    for name in own:
        assert (TEMPLATES / name).exists(), f'{name} is registered but missing'
    # Shared parts a fragment includes (the rows of a jobs table) count as its own.
    shared = {i for name in own for i in _includes(name)}
    for path in TEMPLATES.glob('*.html'):
        uses = '{{ fragment_id }}' in path.read_text() or 'isolated(fragment_id' in path.read_text()
        if path.name in own:
            assert uses or any('{{ fragment_id }}' in (TEMPLATES / i).read_text()
                               for i in _includes(path.name)), \
                f'{path.name} does not render the id the registry gives it'
        else:
            assert not uses or path.name in shared, \
                f'{path.name} renders a fragment id but is no registered fragment'


def _template_ids(text):
    """Ids a template writes: id attributes, #targets and isolated() ids, Jinja as ``{}``."""
    found = re.findall(r'\bid="([^"]*)"', text)
    found += re.findall(r'\bhx-(?:target|select)="(#[^"]*)"', text)
    for arg in re.findall(r'isolated\(([^,)]*)', text):
        if arg.strip():
            # 'job-' ~ job.id ~ '-summary' -> job-{}-summary
            found.append(''.join(p.strip()[1:-1] if p.strip()[:1] in '\'"' else '{}'
                                 for p in arg.split('~')))
    return [JINJA.sub('{}', value) for value in found]


def _module_strings(path):
    """String constants in a module, f-strings with ``{}`` for each value."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.JoinedStr):
            yield ''.join(v.value if isinstance(v, ast.Constant) else '{}' for v in node.values)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.value


def test_no_template_or_module_writes_a_fragment_id_of_its_own():
    patterns = {f: pattern(f) for f in FRAGMENTS}
    for path in TEMPLATES.glob('*.html'):
        for value in _template_ids(path.read_text()):
            if value in ('{}', '#{}'):
                continue
            for fragment, regex in patterns.items():
                assert not regex.match(value), \
                    f'{path.name} writes {value!r}, the id of fragment {fragment.id!r}'
    templates = {f.template for f in FRAGMENTS} | {f.gone_template for f in FRAGMENTS if f.gone}
    for path in (ROOT / 'app').glob('*.py'):
        if path.name == 'fragments.py':
            continue
        for value in _module_strings(path):
            assert value not in templates, f'{path.name} renders {value} itself'
            if value in PAGES:
                continue  # a page's name, which may be its one fragment's id too
            for fragment, regex in patterns.items():
                assert not regex.match(value), \
                    f'{path.name} writes {value!r}, the id of fragment {fragment.id!r}'
    script = (ROOT / 'static' / 'live.js').read_text()
    for fragment in FRAGMENTS:
        assert f"'{fragment.id}'" not in script and f"'#{fragment.id}'" not in script


def test_every_target_in_a_template_is_an_id_something_renders():
    written, targets = set(), []
    for path in TEMPLATES.glob('*.html'):
        for value in _template_ids(path.read_text()):
            if value.startswith('#'):
                targets.append((path.name, value))
            else:
                written.add(value)
    for name, target in targets:
        known = target[1:] in written or any(pattern(f).match(target) for f in FRAGMENTS)
        assert known, f'{name} targets {target}, which no template or fragment renders'


def test_fragment_ids_and_templates_are_unique():
    assert len({f.id for f in FRAGMENTS}) == len(FRAGMENTS)
    assert len({f.template for f in FRAGMENTS}) == len(FRAGMENTS)
