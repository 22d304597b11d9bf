"""Dead-letter reasons are one documented list (issue 10, finding 8).

Every reason that can reach a dead-letter store is a member of
``DeadLetterReason``: each dead-letter call site in ``runtime`` passes a
member, each literal reason the brokers write is a member, and every member
is explained in the README's "Dead letters" section.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from runtime.deadletters import DeadLetterReason

ROOT = Path(__file__).resolve().parents[2]


def _readme_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("\n## Dead letters\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def test_every_reason_is_explained_in_the_readme() -> None:
    section = _readme_section()
    rows = {m.group(1) for m in re.finditer(r"^\| `([a-z_]+)` \|", section, re.MULTILINE)}
    assert rows == {r.value for r in DeadLetterReason}


def _dead_letter_calls(path: Path) -> list[ast.Call]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [node for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "dead_letter"]


def _is_member(arg: ast.expr) -> bool:
    """``Why.X`` / ``DeadLetterReason.X``, or ``_reason(...)`` (which returns a member)."""
    if isinstance(arg, ast.Attribute) and isinstance(arg.value, ast.Name):
        return arg.value.id in ("Why", "DeadLetterReason") and arg.attr in DeadLetterReason.__members__
    if isinstance(arg, ast.Name):
        return arg.id == "reason"  # the worker's _fail: `reason = _reason(...)`
    return isinstance(arg, ast.Call) and isinstance(arg.func, ast.Name) and arg.func.id == "_reason"


def test_every_dead_letter_call_in_the_runtime_passes_a_member() -> None:
    calls = {path: _dead_letter_calls(path) for path in sorted((ROOT / "runtime").rglob("*.py"))}
    assert sum(map(len, calls.values())) >= 1  # the worker's one settle path (Worker._settle)
    bad = [f"{path.relative_to(ROOT)}:{call.lineno}: {ast.unparse(call)}"
           for path, found in calls.items() for call in found
           if not call.args or not _is_member(call.args[0])]
    assert bad == []


def test_the_reasons_the_brokers_write_are_members() -> None:
    # the Redis broker: a module or a package with its Lua scripts beside it
    sources = [*(ROOT / "brokers").glob("redis.py"), *(ROOT / "brokers" / "redis").rglob("*.py"),
               *(ROOT / "brokers" / "redis").rglob("*.lua")]
    assert sources
    redis = "\n".join(path.read_text() for path in sources)
    literals: set[str] = set()
    for expr in re.findall(r"bury\([^,]+,\s*[^,]+,\s*([^,]+),", redis):
        literals.update(re.findall(r"'([a-z_]{3,})'", expr))  # not the verbs 'n', 'd'
    literals.update(re.findall(r"\breason = '([a-z_]+)'", redis))  # in the Lua scripts
    literals.update(re.findall(r"_submit\([^)]*\"d\",\s*\"([a-z_]+)\"\)", redis))
    assert "delivery_limit" in literals
    assert literals <= {r.value for r in DeadLetterReason}


def test_the_worker_documents_where_the_list_is() -> None:
    import runtime.worker

    assert "DeadLetterReason" in (runtime.worker.__doc__ or "")
