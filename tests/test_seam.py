"""One seam between product and simulation: no module of the product imports loop.sim (walked
statically here), and a real-traffic config loads, checks and builds its cycle pieces without it."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = [p for d in ("loop", "serve_apps", "jobs") for p in (ROOT / d).rglob("*.py")
           if not p.is_relative_to(ROOT / "loop" / "sim")]


def _imports_sim(tree: ast.AST) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name == "loop.sim" or a.name.startswith("loop.sim.")
                                                for a in node.names):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module and (
                node.module == "loop.sim" or node.module.startswith("loop.sim.")
                or (node.module == "loop" and any(a.name == "sim" for a in node.names))):
            lines.append(node.lineno)
    return lines


def test_no_product_module_imports_the_simulation():
    assert len(PRODUCT) > 60, "the walk found the product's modules"
    found = {str(p.relative_to(ROOT)): lines for p in PRODUCT if (lines := _imports_sim(ast.parse(p.read_text())))}
    assert found == {}, f"product modules import loop.sim: {found}"


def test_the_walk_catches_an_import():
    assert _imports_sim(ast.parse("def f():\n    from loop.sim.world import World\n")) == [2]
    assert _imports_sim(ast.parse("import loop.sim.users as u\nfrom loop import sim\n")) == [1, 2]
    assert _imports_sim(ast.parse("from loop.simple import x\nimport loop.similar\n")) == []


REAL = """
import sys
from loop.config import load_config, simulation
import loop.cli, loop.driver, loop.cycle, loop.cluster, loop.control.controller, loop.run_report
import loop.validate.gate, loop.models.fetch, loop.serving.gateway, serve_apps.gateway_app
cfg = load_config(sys.argv[1])
assert simulation(cfg) is None
leaked = sorted(m for m in sys.modules if m == "loop.sim" or m.startswith("loop.sim."))
print("LEAKED", leaked)
"""


def test_a_real_traffic_config_imports_nothing_of_the_simulation(tmp_path):
    import yaml

    raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    raw.pop("world")
    raw["traffic"] = {"simulate": False}
    raw["teacher"] = {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "frontier"}
    raw["validation"].pop("suites")
    path = tmp_path / "real.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = subprocess.run([sys.executable, "-c", REAL, str(path)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "LEAKED []" in out.stdout, out.stdout


def test_a_demo_section_in_a_real_config_is_refused_with_the_fix(tmp_path):
    import pytest
    import yaml

    from loop.config import ConfigError, load_config

    raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    raw["traffic"] = {"simulate": False}
    raw["teacher"] = {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}
    raw["validation"].pop("suites")
    path = tmp_path / "real.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="delete the world section"):
        load_config(path)
