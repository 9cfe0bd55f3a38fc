"""A stored traceback read back into frames, so a page can show the task's own code first.

The ledger keeps a traceback as the text Python printed
(``traceback.format_exception``). :func:`parse` reads that text into
:class:`Traceback`: one :class:`Section` per exception of a chain, in the
order Python prints them (the first cause first), each with its frames and
its exception lines. A frame is *framework* when it is not the task's code:
Huey, this project's own plumbing (the ``app`` package), the standard
library or anything installed (``site-packages``); pages fold those.

Text that does not read as a traceback (cut in its middle by the ledger,
an exception group, anything else) gives None: the caller shows it as it is.
"""
import re
from pathlib import Path
from typing import NamedTuple

HEADER = 'Traceback (most recent call last):'
# The lines Python prints between the exceptions of a chain.
CHAINS = ('The above exception was the direct cause of the following exception:',
          'During handling of the above exception, another exception occurred:')

_FRAME = re.compile(r'^  File "(?P<file>.*)", line (?P<line>\d+|None)(?:, in (?P<function>.*))?$')
_REPEATED = re.compile(r'^  \[Previous line repeated \d+ more times?\]$')
# The ledger's mark where it cut a long traceback in its middle (app.text.storable).
_CUT = re.compile(r'… \[[\d,]+ characters, cut\] …')
# An exception's first line: its type (dotted), then its message if any.
_EXCEPTION = re.compile(r'^[A-Za-z_][\w.]*(?::|$)')

# This project's package: its modules, wherever it is installed (a traceback
# may come from a consumer on another host, or in a container).
_APP = Path(__file__).resolve().parent
_APP_FILES = frozenset(p.relative_to(_APP).as_posix() for p in _APP.rglob('*.py'))
_INSTALLED = re.compile(r'[/\\](?:site|dist)-packages[/\\]')
_STDLIB = re.compile(r'[/\\]lib[/\\](?:python\d+(?:\.\d+)?|Python\d*)[/\\]', re.IGNORECASE)


class Frame(NamedTuple):
    """One frame: where (``file``, ``line`` as printed, ``function`` or None), its source
    ``code`` lines as printed (carets included, may be empty), and whether it is framework."""
    file: str
    line: str
    function: str | None
    code: str
    framework: bool


class Section(NamedTuple):
    """One exception of a chain: the line that leads in to it (``chain``: one of
    :data:`CHAINS`, or None for the first), its ``frames`` (outermost first, maybe
    none) and ``exception``, the text of its last lines (``Type: message``, maybe
    several lines)."""
    chain: str | None
    frames: tuple
    exception: str

    @property
    def own(self):
        """The frames of the task's own code, outermost first."""
        return tuple(f for f in self.frames if not f.framework)

    @property
    def folded(self):
        """The framework frames, outermost first."""
        return tuple(f for f in self.frames if f.framework)


class Traceback(NamedTuple):
    """A parsed traceback: its ``sections`` in printed order (the last one is what
    ended the attempt), and the ``text`` it was read from."""
    sections: tuple
    text: str


def is_framework(path):
    """True when the file ``path`` of a frame is not a task's own code.

    Framework: anything installed (``site-packages``, ``dist-packages``, Huey
    among them), the standard library, Python's own ``<frozen …>`` modules,
    and the modules of this project's ``app`` package (found by name under
    any directory called ``app``, so a traceback written on another host reads
    the same). Anything else (``huey_tasks.py``, a ``TASK_MODULES`` module) is
    the task's own.
    """
    path = path.replace('\\', '/')
    if path.startswith('<'):
        return True
    if _INSTALLED.search(path) or _STDLIB.search(path):
        return True
    parts = path.split('/')
    for i, part in enumerate(parts[:-1]):
        if part == 'app' and '/'.join(parts[i + 1:]) in _APP_FILES:
            return True
    return False


def parse(text):
    """``text``, a traceback as Python prints it, read into a :class:`Traceback`.

    Reads single tracebacks, chains (``raise ... from``, an exception raised
    while handling another), exceptions of a chain printed without frames,
    source lines with their ``^^^`` markers and ``[Previous line repeated N
    more times]``. Returns None for anything else: empty text, text the
    ledger cut in its middle, exception groups, text that is not a
    traceback. Never raises.
    """
    if not isinstance(text, str) or not text.strip() or _CUT.search(text):
        return None
    try:
        return _parse(text)
    except Exception:  # a pathological text: shown as it is
        return None


def _parse(text):
    lines = text.rstrip('\n').split('\n')
    blocks, chain, current = [], None, []
    for line in lines:
        if line in CHAINS:
            blocks.append((chain, current))
            chain, current = line, []
        else:
            current.append(line)
    blocks.append((chain, current))
    sections = []
    for chain, block in blocks:
        # The blank lines Python prints around a chain line.
        while block and not block[0].strip():
            block.pop(0)
        while block and not block[-1].strip():
            block.pop()
        section = _section(chain, block)
        if section is None:
            return None
        sections.append(section)
    if not any(s.frames for s in sections):
        return None  # a line that looks like an exception is not a traceback
    return Traceback(tuple(sections), text)


def _section(chain, block):
    if not block:
        return None
    frames, i = [], 0
    if block[0] == HEADER:
        i = 1
        while i < len(block) and block[i].startswith('  '):
            match = _FRAME.match(block[i])
            if match is None:
                if _REPEATED.match(block[i]) and frames:
                    last = frames[-1]
                    frames[-1] = last._replace(code=(last.code + '\n' if last.code else '')
                                               + block[i].strip())
                    i += 1
                    continue
                return None
            code, i = [], i + 1
            while i < len(block) and block[i].startswith('    '):
                code.append(block[i][4:])
                i += 1
            frames.append(Frame(match['file'], match['line'], match['function'],
                                '\n'.join(code), is_framework(match['file'])))
        if not frames:
            return None
    exception = block[i:]
    # The exception's own lines start with its type at the margin (an
    # exception group's lines are indented and boxed: not read here).
    if not exception or not _EXCEPTION.match(exception[0]):
        return None
    return Section(chain, tuple(frames), '\n'.join(exception))
