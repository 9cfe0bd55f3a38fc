"""Text every ledger can store and every page can show.

Two directions. At the edge, user input that cannot be kept is refused:
:func:`problem` says why one string cannot be stored (a lone UTF-16
surrogate has no UTF-8 encoding; PostgreSQL text cannot hold NUL) and
:func:`problems` walks decoded JSON or a form, naming each bad field.

Inside, what tasks produce (exception text, log lines, results) cannot be
refused, so it is made storable instead: :func:`storable` turns any value
into bounded text with the unstorable characters escaped, :func:`dumps`
writes JSON as UTF-8 text (``é``, not ``\\u00e9``, so SQL can search it) and
:func:`loads` reads stored JSON back without ever raising.
"""
import json
import math
import re

# NUL and the surrogate code points: a Python str may hold them, but a
# lone surrogate cannot be encoded as UTF-8 and PostgreSQL text cannot hold NUL.
_UNSTORABLE = re.compile('[\x00\ud800-\udfff]')
_SURROGATE = re.compile('[\ud800-\udfff]')
# The JSON escapes of NUL and of a surrogate: decoded, they may leave behind
# a character that cannot be stored or shown.
_UNSTORABLE_ESCAPE = re.compile(r'\\u(?:0000|[dD][89a-fA-F][0-9a-fA-F]{2})')

MAX_DEPTH = 32          # nesting accepted in a JSON body
MAX_FIELDS = 20         # bad fields named in one answer
UNREADABLE = 'unreadable'  # key of what loads() returns for text that is not JSON


def problem(value):
    """Why the str ``value`` cannot be stored, or None when it can.

    Returns a message that reads after a field name: ``"contains a NUL
    character"`` or ``"contains an unpaired surrogate (U+D800)"``.
    """
    found = _UNSTORABLE.search(value)
    if found is None:
        return None
    if found.group() == '\x00':
        return 'contains a NUL character'
    return f'contains an unpaired surrogate (U+{ord(found.group()):04X})'


def problems(value, prefix='', limit=MAX_FIELDS):
    """``{field: message}`` for every string in ``value`` that cannot be stored.

    ``value`` is decoded JSON (dicts, lists, scalars) or a mapping of form or
    query fields (a werkzeug ``MultiDict``: every value of a repeated key is
    checked). Field paths join keys with ``.`` and list positions with
    ``[i]``, after ``prefix``: ``params.message``, ``ids[3]``. A key that
    cannot be stored is named by its escaped text. JSON nested deeper than
    :data:`MAX_DEPTH` is reported where it goes too deep. At most ``limit``
    fields are named, in document order; ``{}`` means everything can be stored.
    """
    found = {}
    stack = [(prefix, value, 0)]
    while stack and len(found) < limit:
        path, item, depth = stack.pop()
        if isinstance(item, str):
            message = problem(item)
            if message:
                found[path or 'body'] = message
            continue
        if not isinstance(item, (dict, list)) and not hasattr(item, 'lists'):
            continue
        if depth >= MAX_DEPTH:
            found[path or 'body'] = f'is nested more than {MAX_DEPTH} levels deep'
            continue
        if isinstance(item, list):
            children = [(f'{path}[{i}]', v) for i, v in enumerate(item)]
        else:
            pairs = item.lists() if hasattr(item, 'lists') else item.items()
            children = []
            for key, v in pairs:
                key = key if isinstance(key, str) else str(key)
                name = f'{path}.{clean(key)}' if path else clean(key)
                message = problem(key)
                if message:
                    found.setdefault(name, 'its name ' + message)
                if isinstance(v, list) and hasattr(item, 'lists'):
                    children.extend((name, one) for one in v)  # a repeated form field
                else:
                    children.append((name, v))
        stack.extend((p, v, depth + 1) for p, v in reversed(children))
    return dict(list(found.items())[:limit])


def json_problems(body, value):
    """:func:`problems` of ``value``, decoded from the JSON text ``body`` by a strict parser.

    Such a value holds NUL or a surrogate only where ``body`` escapes one
    (``\\u0000``, ``\\ud800``): strict JSON has no raw control character
    in a string, and text decoded from UTF-8 no surrogate. Without such an
    escape only the nesting is looked at, a walk of the containers alone: a
    thousand submissions cost a quarter of what naming every string's path
    does (4 ms against 16).
    """
    if _UNSTORABLE_ESCAPE.search(body) is None and not _deeper_than(value, MAX_DEPTH):
        return {}
    return problems(value)


def _deeper_than(value, depth):
    """Whether decoded JSON ``value`` holds a container ``depth`` or more levels down (the
    top is level 0), as :func:`problems` reports one."""
    stack = [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if level >= depth:
            return True
        stack.extend((child, level + 1) for child in children
                     if isinstance(child, (dict, list)))
    return False


def _pairs_joined(value):
    # Two surrogates that form a pair are one character in UTF-16; join them
    # so that only the lone ones are escaped.
    return value.encode('utf-16-le', 'surrogatepass').decode('utf-16-le', 'surrogatepass')


def clean(value):
    """The str ``value`` with what no ledger can store made visible.

    A lone surrogate becomes its escape as text (``\\ud800``, six
    characters), NUL becomes ``\\x00``; a surrogate pair becomes the one
    character it encodes. Anything else is returned unchanged.
    """
    if _UNSTORABLE.search(value) is None:
        return value
    return _UNSTORABLE.sub(
        lambda m: '\\x00' if m.group() == '\x00' else f'\\u{ord(m.group()):04x}',
        _pairs_joined(value))


def safe_str(obj):
    """``str(obj)``, or its ``repr()`` when that raises, or a placeholder: never raises."""
    for render in (str, repr):
        try:
            return render(obj)
        except Exception:
            pass
    try:
        name = type(obj).__name__
    except Exception:
        name = 'object'
    return f'<unprintable {name} object>'


def storable(value, limit, keep_end=False):
    """Any value as text a ledger can store, of at most ``limit`` characters.

    Non-strings go through :func:`safe_str`; the result is :func:`clean`.
    Longer text is cut and says so (``… [10,485,760 characters, cut]``):
    after its head, or with ``keep_end`` in its middle (a traceback keeps its
    first frames and its last lines).
    """
    if not isinstance(value, str):
        value = safe_str(value)
    total = len(value)
    if total > limit:
        # Cut before cleaning: escaping a 10 MB string would be wasted work.
        value = value[:limit] if not keep_end else value[:limit // 2] + value[-(limit // 2):]
    value = clean(value)
    if total <= limit and len(value) <= limit:
        return value
    note = f'… [{total:,} characters, cut] …' if keep_end else f'… [{total:,} characters, cut]'
    room = limit - len(note)
    if room < 1:
        return value[:limit]
    if keep_end:
        return value[:room - room // 2] + note + value[len(value) - room // 2:]
    return value[:room] + note


def _escape_surrogates_in_json(text):
    # A raw surrogate can only sit inside a JSON string; "\\ud800" there
    # decodes to the six characters \ud800, never to a surrogate again.
    if _SURROGATE.search(text) is None:
        return text
    return _SURROGATE.sub(lambda m: f'\\\\u{ord(m.group()):04x}', _pairs_joined(text))


# What json.dumps(value, ensure_ascii=False, allow_nan=False) makes for each call.
_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False)


def dumps(value):
    """``value`` as JSON text any ledger can store.

    UTF-8 text rather than ASCII escapes (so ``LIKE '%é%'`` finds it), no
    ``NaN``/``Infinity`` (PostgreSQL's json type refuses them), lone
    surrogates escaped as text. A value that is not JSON is stored as
    ``{"repr": "..."}``. Never raises.
    """
    try:
        text = _ENCODER.encode(value)
    except Exception:  # not JSON: sets, objects, NaN, ints past the digit limit, cycles
        text = json.dumps({'repr': storable(value, 64 * 1024)}, ensure_ascii=False)
    return _escape_surrogates_in_json(text)


def _cleaned(value):
    if isinstance(value, str):
        return clean(value)
    if isinstance(value, list):
        return [_cleaned(v) for v in value]
    if isinstance(value, dict):
        return {clean(k): _cleaned(v) for k, v in value.items()}
    return value


def _json_number(literal):
    # 1e999 is valid JSON that Python reads as infinity, which no JSON
    # writer may write back: keep such a number as the text it was.
    number = float(literal)
    return number if math.isfinite(number) else literal


def finite(value):
    """``value`` with every NaN or infinite float (at any depth) as a string.

    JSON has no NaN or Infinity; a response holding one would break a strict
    client's parser for the whole document. Returns ``value`` itself when
    it holds none. Lists, tuples and dicts are copied where changed.
    """
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return 'NaN' if value != value else ('Infinity' if value > 0 else '-Infinity')
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    return value


def loads(raw):
    """A stored JSON value read back; never raises.

    ``raw`` is what the driver returns: str, bytes (psycopg; SQLite for a
    BLOB), or a number SQLite kept as one. Bytes that are not UTF-8 are
    decoded with replacement characters; strings holding NUL or lone
    surrogates come back :func:`clean`; ``NaN``, ``Infinity`` and numbers too
    large for a float (``1e999``) come back as strings;
    text that is not JSON comes back as ``{"unreadable": <its first 1,000
    characters>}``, so one bad row costs its value, never the query.
    """
    if raw is None or isinstance(raw, (bool, int, float)):
        return finite(raw)
    if isinstance(raw, (bytes, bytearray, memoryview)):
        raw = bytes(raw).decode('utf-8', 'replace')
    try:
        value = json.loads(raw, parse_constant=str, parse_float=_json_number)
        if _UNSTORABLE_ESCAPE.search(raw):
            value = _cleaned(value)
        return value
    except (ValueError, TypeError, RecursionError):
        return {UNREADABLE: storable(raw, 1000)}


def decode_lossy(raw):
    """Bytes SQLite returns for TEXT as str; invalid UTF-8 becomes U+FFFD instead of failing the query."""
    return str(raw, 'utf-8', 'replace')
