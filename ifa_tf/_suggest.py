"""`did_you_mean`: the "did you mean" of an error about a mistyped name."""

import difflib


def did_you_mean(value, choices):
    """`" (did you mean 'x'?)"` for the choice closest to a mistyped `value`, or `""`."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
