"""Secret values: how they are shown, and how they are kept out of free text.

A task parameter declared ``Param(..., secret=True)`` holds a secret (a
card number, a token). Wherever the dashboard or the API could show it, it
is shown by :func:`mask`: ``**** 4242``, its last four characters kept and
the rest hidden, or ``****`` alone for a value too short to give any of it
away. What a task writes about its job (log lines, error messages,
tracebacks, progress messages, results) goes through :func:`redact` first,
which replaces each occurrence of a secret value by its mask.
"""
import json

MASK = '****'
# Characters kept at the end of a masked value, and the shortest value that
# keeps them (so at most a third of a secret is ever shown; a card number
# has at least 12 digits).
SHOWN = 4
MIN_SHOWN_LENGTH = 12
# Secrets shorter than this are not looked for in free text: a one-letter
# secret would mask every such letter of every log line. Three covers a CVV.
MIN_REDACTED = 3


def mask(value):
    """``value`` (a secret) as it may be shown: ``**** 4242``, or ``****`` when short.

    None and the empty string stay as they are: there is nothing to hide.
    """
    if value is None:
        return None
    value = str(value)
    if not value:
        return value
    if len(value) >= MIN_SHOWN_LENGTH:
        return f'{MASK} {value[-SHOWN:]}'
    return MASK


def _forms(value):
    """The ways ``value`` may appear in text: as typed, without its separators
    (a card number's digits), and escaped as ``repr()`` and JSON write it."""
    forms = {value, ''.join(ch for ch in value if not ch.isspace() and ch != '-'),
             repr(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1]}
    return [f for f in forms if len(f) >= MIN_REDACTED]


class Redactor:
    """Replaces the secret values ``secrets`` by their masks, in text and in JSON-like values.

    Values that are not non-empty strings are skipped. Built once for the
    secrets of a job, used for each line it logs. False when it has
    nothing to replace.
    """

    def __init__(self, secrets=()):
        pairs = {}
        for value in secrets:
            if isinstance(value, str) and value:
                for form in _forms(value):
                    pairs.setdefault(form, mask(value))
        # Longest first, so a secret that contains another is masked whole.
        self.pairs = sorted(pairs.items(), key=lambda p: -len(p[0]))

    def __bool__(self):
        return bool(self.pairs)

    def text(self, text):
        """``text`` with every occurrence of a secret replaced; a non-str is returned as it is."""
        if not isinstance(text, str):
            return text
        for form, masked in self.pairs:
            if form in text:
                text = text.replace(form, masked)
        return text

    def value(self, value):
        """A JSON-like ``value`` with :meth:`text` applied to every string in it, keys included."""
        if not self.pairs:
            return value
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self.value(k): self.value(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.value(v) for v in value]
        return value


def redact(text, secrets):
    """``text`` with each occurrence of each of the values ``secrets`` replaced by its mask."""
    return Redactor(secrets).text(text)
