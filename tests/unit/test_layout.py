"""The house's rules (tools/check_layout.py) hold for the project, and the checker sees a breach
of each rule when there is one."""
from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("check_layout", ROOT / "tools" / "check_layout.py")
check_layout = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_layout)


def test_the_project_keeps_the_rules():
    assert check_layout.check(ROOT) == []


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


def test_each_rule_is_seen_broken(tmp_path):
    _write(tmp_path, "mtl/__init__.py", "")
    _write(tmp_path, "cluster/__init__.py", "")
    _write(tmp_path, "mtl/a.py", """\
        def f():
            from mtl.b import g
            return g()
        """)
    _write(tmp_path, "mtl/b.py", "from mtl import a\n\n\ndef g():\n" + "    x = 1\n" * 60 + "    return a\n")
    _write(tmp_path, "cluster/c.py", """\
        def h():
            import mtl.a  # keeps torch off the dry-run path
            return mtl.a
        """)
    _write(tmp_path, "README.md", "mtl/a.py and mtl.b are named; cluster/c.py too\n")
    breaches = check_layout.check(tmp_path)
    assert "import circle: mtl.a <-> mtl.b" in breaches
    assert any(b.startswith("mtl/a.py:2: imports mtl.b inside a function without a comment") for b in breaches)
    assert any(b.startswith("mtl/b.py:4: g is 62 lines, over the 60") for b in breaches)
    assert not any(b.startswith("cluster/c.py") for b in breaches)        # commented, and named
    _write(tmp_path, "README.md", "mtl/a.py\n")
    missing = [b for b in check_layout.check(tmp_path) if "README.md does not name" in b]
    assert sorted(b.split(":")[0] for b in missing) == ["cluster/c.py", "mtl/b.py"]
