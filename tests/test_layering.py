"""The layering the README describes, enforced on the source: dependencies point one way,
app -> convert / train -> runtime (`pudding_mlx/`). The runtime never imports app, convert or train,
nor torch; convert never imports train or app; train never imports convert, app or MLX, and what it
takes from the runtime is torch- and MLX-free. No module imports a private transformers module,
except the one guarded fallback named below."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder in the repository -> package name once installed (pyproject's package-dir)
PACKAGES = {"pudding_mlx": "pudding_mlx", "app": "pudding_mlx.app", "convert": "pudding_mlx.convert",
            "train": "pudding_mlx.train"}
LAYER = {"pudding_mlx": "runtime", "pudding_mlx.app": "app", "pudding_mlx.convert": "convert",
         "pudding_mlx.train": "train"}
FORBIDDEN = {  # layer -> layers it must not import
    "runtime": {"app", "convert", "train"},
    "convert": {"app", "train"},
    "train": {"app", "convert"},
    "app": set(),
}


def modules() -> dict:
    """{dotted module name: path} for every module of the four packages."""
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            out[name] = path
    return out


def layer_of(module: str) -> str:
    for package in ("pudding_mlx.app", "pudding_mlx.convert", "pudding_mlx.train"):
        if module == package or module.startswith(package + "."):
            return LAYER[package]
    return "runtime"


def imports(name: str, path: Path) -> list:
    """Every module `path` imports, at any depth (lazy imports inside functions count), resolved to
    absolute names; `from pkg import mod` yields pkg.mod too."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.append(target)
            found += [f"{target}.{alias.name}" for alias in node.names]
    return found


ALL = modules()


@pytest.mark.parametrize("name", sorted(ALL))
def test_dependencies_point_one_way(name):
    own = layer_of(name)
    bad = sorted({m for m in imports(name, ALL[name])
                  if m.startswith("pudding_mlx") and layer_of(m) in FORBIDDEN[own]})
    assert not bad, f"{ALL[name].relative_to(ROOT)} ({own}) imports {bad}"


@pytest.mark.parametrize("name", sorted(n for n in ALL if layer_of(n) == "runtime"))
def test_runtime_imports_no_torch(name):
    bad = [m for m in imports(name, ALL[name]) if m.split(".")[0] in ("torch", "accelerate")]
    assert not bad, f"{ALL[name].relative_to(ROOT)} imports {bad}"


def _runtime_closure(name: str, seen: set) -> set:
    """The runtime modules `name` imports, transitively."""
    if name in seen or name not in ALL:
        return seen
    seen.add(name)
    for m in imports(name, ALL[name]):
        if m in ALL and layer_of(m) == "runtime":
            _runtime_closure(m, seen)
    return seen


@pytest.mark.parametrize("name", sorted(n for n in ALL if layer_of(n) == "train"))
def test_train_side_needs_no_mlx(name):
    """The training side runs on a GPU box without MLX: neither it nor the runtime modules it uses
    (transitively) may import mlx or mlx_lm."""
    used = set()
    for m in imports(name, ALL[name]):
        if m in ALL and layer_of(m) == "runtime":
            _runtime_closure(m, used)
    offenders = {}
    for m in sorted({name} | used):
        bad = [i for i in imports(m, ALL[m]) if i.split(".")[0] in ("mlx", "mlx_lm")]
        if bad:
            offenders[str(ALL[m].relative_to(ROOT))] = bad
    assert not offenders, f"{name} reaches MLX through {offenders}"


# The only private transformers module named anywhere: the torch-free fallback for reading a GGUF
# tokenizer (convert/llm.py), tried only when transformers' public API cannot run (no torch), and
# turned into one line when the module is absent (as in transformers 5.17).
PRIVATE_ALLOWED = {("pudding_mlx.convert.llm", "transformers.integrations.gguf.gguf_tokenizer_mapping")}


@pytest.mark.parametrize("name", sorted(ALL))
def test_no_private_transformers_imports(name):
    """transformers' public API is its top-level namespace; anything deeper moves between the
    versions we allow (issue 12, item 1: a private module that 5.24 has and 5.17 has not)."""
    tree = ast.parse(ALL[name].read_text())
    named = [m for m in imports(name, ALL[name]) if m.startswith("transformers.")]
    # an import by name through importlib counts as well
    named += [node.value for node in ast.walk(tree)
              if isinstance(node, ast.Constant) and isinstance(node.value, str)
              and node.value.startswith("transformers.") and " " not in node.value]
    public = {f"transformers.{n}" for n in dir(__import__("transformers")) if not n.startswith("_")}
    bad = sorted({m for m in named if m not in public and (name, m) not in PRIVATE_ALLOWED})
    assert not bad, f"{ALL[name].relative_to(ROOT)} imports private transformers modules {bad}"


def test_the_layers_exist():
    """A guard against the test passing vacuously (a renamed folder, an empty walk)."""
    layers = {layer_of(n) for n in ALL}
    assert layers == {"runtime", "app", "convert", "train"} and len(ALL) > 30
    assert "pudding_mlx.convert.llm" in ALL and "pudding_mlx.train.search" in ALL
    assert "pudding_mlx.tasks" in imports("pudding_mlx.evaluate", ALL["pudding_mlx.evaluate"])
