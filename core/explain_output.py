"""What `python -m core explain` prints: a table per method, or a JSON view of each explanation.
Review text is untrusted: it is printed as plain text, its unprintable characters escaped."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .backend import Backend
    from .engine import TestInput
    from .explanations import Explanation


def json_view(backend: Backend, exp: Explanation, opponents: bool) -> dict:
    """An explanation for `explain --json`: its hits with their training text, aspect, label and span."""
    data = exp.to_dict()
    data.pop("scores")
    if not opponents:
        data.pop("opponents")
    by_id = backend.by_id
    for key in ("top", "opponents"):
        for hit in data.get(key, []):
            r = by_id[hit["train_id"]]
            hit.update(text=r.text, aspect=r.aspect, label=r.label, span=list(r.span_pair) if r.span else None,
                       span_source=r.span_source)
    return data


def print_table(backend: Backend, test: TestInput, exp: Explanation, opponents: bool) -> None:
    """An explanation as `explain` prints it: how it was computed, warnings, then its hits."""
    span = test.text[test.span[0]:test.span[1]] if test.span else "-"
    print(f"\n{exp.method}  test {test.id or '(new review)'}  aspect {test.aspect!r}  span {span!r}")
    approx = dict(exp.approx)
    ihvp, top_k = approx.get("ihvp"), approx.get("top_k", {})
    if isinstance(ihvp, dict):
        approx["ihvp"] = {k: v for k, v in ihvp.items() if k != "trace"}  # the trace: in --json
    if "warning" in top_k:
        approx["top_k"] = {k: v for k, v in top_k.items() if k != "warning"}  # printed below as a warning
    print(f"  {json.dumps(approx)}")
    if isinstance(ihvp, dict) and ihvp.get("mode") == "lissa" and (ihvp.get("diverged") or not ihvp.get("converged")):
        state = "diverged" if ihvp.get("diverged") else f"did not converge in {ihvp.get('steps')} steps (raise --lissa-depth)"
        print(f"  warning: LiSSA {state}; these scores are not reliable")
    if "warning" in top_k:
        print(f"  warning: {top_k['warning']}")
    by_id = backend.by_id
    for title, hits in (("proponents", exp.top), ("opponents", exp.opponents if opponents else [])):
        if not hits:
            continue
        print(f"  {title}:")
        for hit in hits:
            r = by_id[hit.train_id]
            text = r.text if not r.span else f"{r.text[:r.span.start]}[{r.text[r.span.start:r.span.end]}]{r.text[r.span.end:]}"
            first = f"{r.aspect!r}: " if r.aspect else ""  # a single text has no aspect
            print(f"  {hit.rank:>3} {hit.score:>+11.4g}  {r.label:<8} {first}{printable(text[:140])}")


def printable(text: str) -> str:
    """Review text for a terminal: characters that are not printable (control characters, the
    escape that starts a terminal sequence) are shown escaped, never sent as they are."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
