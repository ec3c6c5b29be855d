"""The architecture as tests: a layered, acyclic import graph, no process-wide seeding, CLI defaults from configs."""

import ast
import inspect
from dataclasses import fields
from pathlib import Path

import pytest

from hdb.cli import build_parser, config_from_args
from hdb.config import BenchOptions, HypernetTrainConfig, LiDBConfig, PersonalizeConfig, PreoptimizeConfig

PACKAGE = Path(__file__).resolve().parent.parent / "hdb"


def hdb_imports() -> dict[str, set[str]]:
    """module -> the hdb modules it imports, anywhere in the file (function-level imports included)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hdb"):
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names if alias.name.startswith("hdb")}
        graph[module] = imported - {module}
    return graph


def test_the_import_graph_is_acyclic():
    graph = hdb_imports()
    done, active = set(), []

    def visit(module: str) -> None:
        if module in active:
            raise AssertionError(f"import cycle: {' -> '.join(active[active.index(module) :] + [module])}")
        if module in done:
            return
        active.append(module)
        for dependency in graph.get(module, ()):
            visit(dependency)
        active.pop()
        done.add(module)

    for module in graph:
        visit(module)


def test_the_library_does_not_reach_up_into_the_commands_or_the_toy():
    graph = hdb_imports()
    top = {"hdb.cli", "hdb.__main__", "hdb.bench"} | {m for m in graph if m.startswith("hdb.toy")}
    for module, imported in graph.items():
        if module not in top:
            assert not imported & top, f"{module} imports {imported & top}"
    # stages import shared code, never another stage
    stages = {"hdb.personalize", "hdb.preoptimize", "hdb.train_hypernet"}
    for stage in stages:
        assert not graph[stage] & (stages - {stage}), f"{stage} imports {graph[stage] & stages}"


def test_plotting_and_heavy_libraries_stay_out_of_the_light_modules():
    sources = {path.relative_to(PACKAGE).as_posix(): path.read_text() for path in PACKAGE.rglob("*.py")}
    assert [name for name, text in sources.items() if "matplotlib" in text] == ["toy/report.py"]
    for light in ("config.py", "errors.py", "cli.py"):  # `python -m hdb --help` must not wait for torch
        tree = ast.parse(sources[light])
        top_level = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
        names = [n.module if isinstance(n, ast.ImportFrom) else n.names[0].name for n in top_level]
        assert not [n for n in names if n and n.split(".")[0] in ("torch", "diffusers", "transformers")], light


PROCESS_WIDE_RANDOM = ("torch", "random", "np", "numpy")  # modules whose seeding functions seed the whole process
SEEDING = ("manual_seed", "manual_seed_all", "seed")


def dotted_name(node: ast.expr) -> str | None:
    """The dotted name of an expression, e.g. torch.cuda.default_generators (subscripts skipped); None for a call."""
    parts = []
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        if isinstance(node, ast.Attribute):
            parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else None


def process_wide_seeding(source: str) -> list[str]:
    """Calls in `source` that seed a process-wide RNG outside a `torch.random.fork_rng()` scope, which puts it back."""
    tree = ast.parse(source)
    forked = {
        id(node)
        for scope in ast.walk(tree)
        if isinstance(scope, ast.With)
        and any(
            isinstance(item.context_expr, ast.Call) and dotted_name(item.context_expr.func) == "torch.random.fork_rng"
            for item in scope.items
        )
        for statement in scope.body
        for node in ast.walk(statement)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in SEEDING:
            owner = dotted_name(node.func.value)  # torch.Generator().manual_seed(...) has none: its own generator
            if owner is not None and owner.split(".")[0] in PROCESS_WIDE_RANDOM and id(node) not in forked:
                found.append(f"line {node.lineno}: {owner}.{node.func.attr}")
    return found


def test_nothing_in_hdb_seeds_the_process_wide_random_state():
    # generators are passed explicitly; module constructors draw inside hdb.seeding.initialised_from's fork
    found = {
        path.relative_to(PACKAGE).as_posix(): process_wide_seeding(path.read_text()) for path in PACKAGE.rglob("*.py")
    }
    assert {name: calls for name, calls in found.items() if calls} == {}
    caught = "import random, torch\nimport numpy as np\ntorch.manual_seed(0)\ntorch.cuda.manual_seed_all(0)\n"
    caught += "random.seed(0)\nnp.random.seed(0)\ntorch.random.default_generator.manual_seed(0)\n"
    assert len(process_wide_seeding(caught)) == 5  # the rule sees what it looks for
    allowed = "with torch.random.fork_rng(devices=[]):\n    torch.manual_seed(0)\ntorch.Generator().manual_seed(0)\n"
    assert process_wide_seeding(allowed) == []


def parse(*argv: str):
    return build_parser().parse_args(list(argv))


@pytest.mark.parametrize(
    ("argv", "config", "overrides"),
    [
        (["personalize", "me.jpg", "-o", "me.safetensors"], PersonalizeConfig, {}),
        (["preoptimize", "--images", "i", "--out", "o"], PreoptimizeConfig, {}),
        (["train", "--images", "i", "--out", "o"], HypernetTrainConfig, {}),
        (["bench"], BenchOptions, {}),
    ],
)
def test_cli_defaults_are_the_config_defaults(argv, config, overrides):
    args = parse(*argv)
    assert config_from_args(config, args) == config(**overrides)
    shared = [f.name for f in fields(config) if hasattr(args, f.name)]
    assert len(shared) >= 5, shared  # the options really come from the dataclass


def test_cli_options_reach_the_config():
    args = parse("personalize", "me.jpg", "-o", "x", "--rank", "2", "--lr", "0.01", "--optimizer", "adamw8bit")
    assert config_from_args(PersonalizeConfig, args) == PersonalizeConfig(
        relaxed_rank=2, learning_rate=0.01, optimizer="adamw8bit"
    )
    assert parse("preoptimize", "--images", "i", "--out", "o").rank == LiDBConfig().rank
    assert parse("bench", "--no-baselines").baselines is False
    assert parse("train", "--images", "i", "--out", "o").base == parse("personalize", "p", "-o", "x").base


def test_generate_defaults_match_the_function():
    from hdb.generate import generate

    args = parse("generate", "--person", "p", "--prompt", "[V]", "-o", "x.png")
    signature = inspect.signature(generate).parameters
    for option, parameter in [("steps", "steps"), ("guidance", "guidance"), ("seed", "seed"),
                              ("num_images", "num_images"), ("strength", "identity_strength")]:  # fmt: skip
        assert getattr(args, option) == signature[parameter].default, option


def test_push_is_wired():
    from hdb.cli import cmd_push

    args = parse("push", "run/hypernet/hypernet", "someone/hdb-hypernet", "--private")
    assert args.run is cmd_push and args.repo_id == "someone/hdb-hypernet" and args.private and args.eval is None
