"""The package layout is a stack: a module imports only its own package or the ones below it,
and no two modules import each other, directly or around a circle (docs/architecture.md)."""

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Bottom to top; each package may import the ones listed before it.
LAYERS = ("_tpu_host", "runtime", "config", "data", "models", "convert", "parallel", "losses",
          "eval", "indexing", "serve", "train", "perf", "aot", "experiments", "main")


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path, name: str, modules: set[str]) -> set[str]:
    """vlp_jax modules imported anywhere in the file (function-level imports included)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("vlp_jax")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            if base.startswith("vlp_jax"):
                # `from vlp_jax.train import step` imports the module vlp_jax.train.step.
                found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                          for a in node.names}
    return found


def _graph() -> dict[str, set[str]]:
    """Module -> the modules it imports, without edges to its own enclosing packages (Python
    runs a package's ``__init__`` before any of its modules anyway; that is not a circle)."""
    files = {_module_name(p): p for p in (ROOT / "vlp_jax").rglob("*.py")}
    graph = {}
    for name, path in files.items():
        deps = _imports(path, name, set(files))
        graph[name] = {m for m in deps if m != name and not name.startswith(m + ".")}
    return graph


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    if top not in LAYERS:
        raise AssertionError(f"{module}: package {top!r} has no place in LAYERS")
    return LAYERS.index(top)


def test_no_module_imports_a_package_above_its_own():
    upward = [f"{a} imports {b}" for a, deps in _graph().items() if a != "vlp_jax"
              for b in deps if b != "vlp_jax" and _layer(b) > _layer(a)]
    assert upward == []


def test_no_import_circles_between_modules():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


# Inside vlp_jax.data (its docstring): the shared modules directly in the package import none of
# its subpackages; input imports only the shared modules; catalog never imports build.
DATA_FORBIDDEN = {"shared": ("build", "input", "catalog"), "input": ("build", "catalog"),
                  "catalog": ("build",), "build": ()}


def test_data_input_never_imports_data_build():
    graph = _graph()
    subpackages = {"build", "input", "catalog"}

    def part(module: str) -> str:
        name = module.split(".")[2] if module.count(".") >= 2 else ""
        return name if name in subpackages else "shared"

    wrong = [f"{a} imports {b}" for a, deps in graph.items() if a.startswith("vlp_jax.data.")
             for b in deps if b.startswith("vlp_jax.data.") and part(b) in DATA_FORBIDDEN[part(a)]]
    assert wrong == []


@pytest.mark.parametrize("module, flag", [
    ("vlp_jax.main", "--workdir"), ("vlp_jax.data.catalog", "--num_items"),
    ("vlp_jax.data.build", "--runner"),
    ("vlp_jax.serve.server", "--bundle"), ("vlp_jax.indexing.index", "--base_dir"),
    ("vlp_jax.convert.hf_bert", "--src"), ("vlp_jax.experiments.ablate", "--grid"),
    ("vlp_jax.aot", "--topology"),
])
def test_public_entry_points_still_run(module, flag):
    """``python -m`` of every documented entry point imports and lists its flags (absl's help
    exits 1 by design)."""
    out = subprocess.run([sys.executable, "-m", module, "--helpfull"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and f"  {flag}" in out.stdout, out.stderr[-2000:]


def test_benchmarks_and_scripts_import_only_modules_that_exist():
    """Every ``vlp_jax`` import in benchmarks/, configs/ and docs/ scripts names a module (or a
    name in one) that exists after the package moves; checked statically, nothing imported."""
    files = {_module_name(p) for p in (ROOT / "vlp_jax").rglob("*.py")}
    missing = []
    for folder in ("benchmarks", "configs", "docs", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vlp_jax"):
                    if node.module not in files:
                        missing.append(f"{path.relative_to(ROOT)}: {node.module}")
                elif isinstance(node, ast.Import):
                    missing += [f"{path.relative_to(ROOT)}: {a.name}" for a in node.names
                                if a.name.startswith("vlp_jax") and a.name not in files]
    assert missing == []


# ---- docs/architecture.md states the same rules: checked here, so the two cannot drift apart.
ARCHITECTURE = ROOT / "docs" / "architecture.md"


def _doc_section(title: str) -> str:
    text = ARCHITECTURE.read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 3)
    return text[start:] if end < 0 else text[start:end]


def _package_bullets() -> list[tuple[str, str]]:
    """(package, its paragraph) for each top-level bullet of the packages section."""
    import re

    section = _doc_section("Packages and what each may import")
    parts = re.split(r"^- \*\*`([A-Za-z_]+)(?:/|\.py)`\*\*", section, flags=re.M)
    return [(parts[i], parts[i + 1].split("\n\nOutside the package")[0])
            for i in range(1, len(parts), 2)]


def test_architecture_doc_lists_the_layers_in_this_order():
    assert tuple(name for name, _ in _package_bullets()) == LAYERS


def test_architecture_doc_names_only_modules_that_exist():
    import re

    missing = []
    for package, paragraph in _package_bullets():
        base = ROOT / "vlp_jax" / package
        for name in re.findall(r"`([a-z_0-9/]+(?:\.py|/))`", paragraph):
            if not any((d / name).exists() for d in (base, ROOT, ROOT / "vlp_jax")):
                missing.append(f"{package}: {name}")
    text = ARCHITECTURE.read_text()
    for dotted in sorted(set(re.findall(r"vlp_jax(?:\.[A-Za-z_][A-Za-z_0-9]*)+", text))):
        parts = dotted.split(".")
        path, i = ROOT, 0
        while i < len(parts) and ((path / parts[i]).is_dir() or
                                  (path / f"{parts[i]}.py").exists()):
            path, i = path / parts[i], i + 1
        if i < len(parts):  # the rest must be names defined in that module
            module = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
            tree = ast.parse(module.read_text()) if module.exists() else ast.Module([], [])
            defined = set()
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                    defined.add(node.name)
                elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    defined |= {t.id for t in targets if isinstance(t, ast.Name)}
                elif isinstance(node, ast.ImportFrom):
                    defined |= {a.asname or a.name for a in node.names}
            if parts[i] not in defined:
                missing.append(dotted)
    assert missing == []


def test_the_catalog_oracle_stays_out_of_the_product_path():
    """The built-in catalog (and its relevance oracle) is a lab tool: the loss, the model, the
    sharded primitives and serving never import it; the train objective injects the oracle."""
    product = ("vlp_jax.models", "vlp_jax.parallel", "vlp_jax.losses", "vlp_jax.indexing",
               "vlp_jax.serve")
    leaks = [f"{a} imports {b}" for a, deps in _graph().items() if a.startswith(product)
             for b in deps if b.startswith("vlp_jax.data.catalog")]
    assert leaks == []
