"""User-facing errors: each carries one line that names the file or flag and what was expected."""

import re
import string
import sys


class VSRNError(Exception):
    """Base class of the errors a user can act on; the scripts print them as one line and exit 2.

    A library error made with `naming` says what is wrong in the library's words: its message is a
    template whose `{field}` placeholders name the fields of a request (`topk`, `images`), the other
    placeholders its `values` (paths, numbers), filled in as they are. `str()` names each field as the
    library does; a script words it as its flag (`--topk`) and the server as its parameter, with `worded`.
    """

    template, values = None, {}

    @classmethod
    def naming(cls, template, **values):
        """The error of `template`, whose placeholders other than `values` are request fields."""
        error = cls(_fill(template, values, lambda field: field))
        error.template, error.values = template, values
        return error

    @property
    def fields(self):
        """The request fields the message names, in order (none for a plain message)."""
        return _fields(self.template, self.values) if self.template else []

    def worded(self, names=None):
        """The message with each field named by `names` (a mapping, or a function of the field's name; a field
        neither gives is named as it is)."""
        if self.template is None:
            return str(self)
        if names is None:
            names = {}
        return _fill(self.template, self.values, names if callable(names) else lambda field: names.get(field, field))


def _fields(template, values):
    names = (name for _, name, _, _ in string.Formatter().parse(template) if name)
    return list(dict.fromkeys(name for name in names if name not in values))


def _fill(template, values, word):
    return template.format_map({**{field: word(field) for field in _fields(template, values)}, **values})


def as_flag(field):
    """A request field as the scripts' flags name it: `topk` -> `--topk`."""
    return f"--{field}"


class DataError(VSRNError):
    """A dataset file is missing or does not have the expected layout or content."""


class VocabularyError(VSRNError):
    """A vocabulary file cannot be read or is not safe to read."""


class CheckpointError(VSRNError):
    """A checkpoint file cannot be read, is not safe to read, or does not fit the model."""


class OptionError(VSRNError):
    """A command-line flag has a value the model cannot run with."""


_WORKER_PREFIX = re.compile(r"^(?:\w+\.)*\w+Error: ")


def one_line(error):
    """The user-facing line of an error, also when a DataLoader worker re-raised it.

    Worker processes re-raise with the whole remote traceback in the message; the
    original message is its last line, after the exception's qualified name.
    """
    text = str(error).strip()
    if "\n" not in text:
        return text
    last = text.splitlines()[-1]
    return _WORKER_PREFIX.sub("", last, count=1)


def first_line(error, limit=None):
    """The first line of an error's message (its class name when it has none), cut to `limit` characters."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line[:limit] if limit else line


def without_path(message, path):
    """An error's message about the file at `path` without the path it begins with (where the path is said apart)."""
    prefix = f"{path}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


def report(error, flags=as_flag):
    """Print a VSRNError (exit code 2) or an OSError (exit code 1) as one line; return the code. The
    request fields a VSRNError names are worded as `flags` says (the script's flags)."""
    if isinstance(error, VSRNError):
        print(f"error: {one_line(error.worded(flags))}", file=sys.stderr)
        return 2
    where = f"{error.filename}: " if error.filename else ""
    print(f"error: {where}{error.strerror or error}", file=sys.stderr)
    return 1


class ScoreError(VSRNError):
    """Scores to rank are not all numbers: NaN or infinite (a diverged model, a non-finite feature)."""


class Interrupted(Exception):
    """Ctrl-C (SIGINT) stopped a job; the message says what was kept and how to continue."""


def report_interrupt(kept):
    """Print the one line of a job stopped by Ctrl-C, `kept` saying what stays and how to continue
    (an Interrupted's message, or the script's); return 130 (128 + SIGINT)."""
    print(f"error: interrupted; {kept}", file=sys.stderr)
    return 130


def run_job(work, interrupted, flags=as_flag):
    """A script's exit code for running `work()`: 0 when it ends; 2 or 1 with one line for a VSRNError or
    an OSError (the request fields a VSRNError names worded as `flags` says); 130 with one line for Ctrl-C: an
    Interrupted's own message, else `interrupted` (what was kept, and how to go on)."""
    try:
        work()
    except (VSRNError, OSError) as e:
        return report(e, flags)
    except Interrupted as e:
        return report_interrupt(str(e))
    except KeyboardInterrupt:
        return report_interrupt(interrupted)
    return 0
