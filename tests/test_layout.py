"""The package layout rules of docs/INTERFACES.md: import direction, no import cycles, a light store read.

Import direction is checked by import-linter (the contracts in pyproject.toml, ``uv run lint-imports``); the import
graph is grimp's (import-linter's own), which counts every import: module level, inside functions (deferred) and under
``if TYPE_CHECKING:`` (type-only). A deferred or type-only import cannot fail at import time, but it is still a
dependency: a circle through one means two modules are one concept or a contract between them is missing.
"""

from __future__ import annotations

import ast
import functools
import importlib
import json
import os
import pathlib
import subprocess
import sys

import grimp
import numpy as np
import pytest
from importlinter import api as _importlinter_api  # (importing it configures import-linter's adapters)
from importlinter.application import use_cases

from openpi import envs
from openpi.envs import base
from openpi.latents import store

SRC = pathlib.Path(__file__).resolve().parents[1] / "src"
OPENPI = SRC / "openpi"
REPO = SRC.parent
# What reading a store must not import (model, policy and env code, and jax under them).
HEAVY = ("jax", "flax", "openpi.models", "openpi.policies", "openpi.envs")


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _from_base(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module named by ``from <...> import`` in ``module`` (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    anchor = module.split(".") if is_package else module.split(".")[:-1]
    anchor = anchor[: len(anchor) - (node.level - 1)]
    return ".".join([*anchor, node.module] if node.module else anchor)


@functools.cache
def import_graph() -> dict[str, frozenset[str]]:
    """{module: the openpi modules it imports}, every import counted (module level, deferred, type-only).

    ``src/`` holds ``openpi`` and ``expert_data_utils.py``; the latter imports openpi and nothing imports it, so it
    can be on no cycle and the graph is openpi's."""
    graph = grimp.build_graph("openpi", cache_dir=None)
    return {m: frozenset(graph.find_modules_directly_imported_by(m)) for m in graph.modules}


def import_cycles(graph: dict[str, frozenset[str]] | dict[str, set[str]]) -> list[list[str]]:
    """Every import circle: the strongly connected components of more than one module, each sorted, listed in order
    (Tarjan's algorithm, iterative). A module importing itself by name (openpi.envs.worker, for the names its pickles
    carry) is no circle between files."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in graph:
                    continue
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return sorted(out)


def test_cycle_finder_finds_planted_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": {"d"}, "f": {"f"}, "g": {"a"}}
    assert import_cycles(graph) == [["a", "b", "c"], ["d", "e"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_graph_sees_submodule_type_only_and_deferred_imports():
    graph = import_graph()
    # writer.py: `from openpi.latents.store import format as sf` is an edge to the submodule, not the package
    assert "openpi.latents.store.format" in graph["openpi.latents.store.writer"]
    assert "openpi.latents.store" not in graph["openpi.latents.store.writer"]
    # type-only: text_latent.py imports the model config under `if TYPE_CHECKING:`
    assert "openpi.models.pi0_config" in graph["openpi.latents.text_latent"]
    # deferred: the analysis source imports the store reader inside a function (make_source)
    assert "openpi.latents.store.reader" in graph["openpi.latents.analysis.data.source"]


def _cycles_within(prefixes: tuple[str, ...]) -> list[list[str]]:
    return [c for c in import_cycles(import_graph()) if any(m.startswith(prefixes) for m in c)]


def test_no_import_cycles_in_analysis_or_report():
    cycles = _cycles_within(("openpi.latents.analysis", "openpi.latents.report"))
    assert cycles == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


# Every circle, in every package, deferred and type-only imports included (issue 17 part 5: models/ by the model seam,
# store/, collect/ and latents/ by the run contract, analysis/ and report/ by the settings split).
def test_no_import_cycles_in_src():
    cycles = import_cycles(import_graph())
    assert cycles == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


CONTRACTS = ("models-standalone", "envs-standalone", "analysis-report-no-policies-envs", "store-writer-no-reader")


def _assert_kept(contract_id: str) -> None:
    """import-linter's own check of one contract of pyproject.toml (its report is printed: shown on failure)."""
    kept = use_cases.lint_imports(
        str(REPO / "pyproject.toml"), limit_to_contracts=(contract_id,), cache_dir=None, no_logo=True
    )
    assert kept, f"import-linter contract {contract_id!r} broken (report above)"


# The producer side and the store (issue 17 part 5, outside analysis/ and models/): no circle even through a deferred
# or a type-only import. The four circles it had: store writer <-> episode_writer, store reader <-> views, collect
# run <-> ray_backend, text_latent <-> collect.conditions.
_NO_CIRCLE_PACKAGES = (
    "openpi.latents.store",
    "openpi.latents.collect",
    "openpi.latents.recording",
    "openpi.latents.replay",
    "openpi.serving",
    "openpi.latents.text_latent",
    "openpi.latents.schema",
    "openpi.latents.synthetic_collection",
)


def test_no_circles_through_deferred_or_type_only_imports_on_the_producer_side():
    graph = import_graph()
    # deferred and type-only imports are edges here (the module-level graph skips both)
    assert "openpi.latents.collect.ray_backend" in graph["openpi.latents.collect.run"]  # imported inside a function
    assert "openpi.models.pi0_config" in graph["openpi.latents.text_latent"]  # imported under TYPE_CHECKING
    ours = {m for m in graph if m.startswith(_NO_CIRCLE_PACKAGES)}
    assert "openpi.latents.store.views" in ours and "openpi.latents.collect.ray_backend" in ours
    cycles = import_cycles({m: graph[m] & ours for m in ours})
    assert cycles == [], "import cycles (deferred and type-only imports included): " + "; ".join(map(str, cycles))


def test_no_producer_imports_another_producers_internals():
    """The collection, the server, the replay and the synthetic collection share `openpi.latents.recording` (and the
    store); none imports another's package, deferred and type-only imports included."""
    producers = {
        "collection": ("openpi.latents.collect",),
        "server": ("openpi.serving",),
        "replay": ("openpi.latents.replay",),
        "synthetic": ("openpi.latents.synthetic_collection",),
    }
    graph = import_graph()
    bad = [
        f"{module} ({name}) imports {target}"
        for name, own in producers.items()
        for module, targets in graph.items()
        if module.startswith(own)
        for target in targets
        if any(target.startswith(other) for n, o in producers.items() if n != name for other in o)
    ]
    assert not bad, bad
    assert "openpi.latents.recording.records" in graph["openpi.serving.recording"]


def test_store_writer_imports_no_reader():
    _assert_kept("store-writer-no-reader")  # direct or indirect, deferred and type-only included

    tree = ast.parse((OPENPI / "latents" / "schema.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    light = {"__future__", "dataclasses", "math", "collections.abc", "typing", "numpy", "ml_dtypes"}
    assert imported <= light | {"openpi.shared.record_keys"}, imported


def test_the_record_keys_have_one_home_that_the_model_the_store_and_the_analysis_import():
    """openpi.shared.record_keys names every record key (stdlib only); the model's capture (sampling), the store's
    schema and the analysis's streams import it rather than spelling the keys themselves."""
    tree = ast.parse((OPENPI / "shared" / "record_keys.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert imported <= {"__future__", "dataclasses", "typing"}, imported
    graph = import_graph()
    for user in ("openpi.models.sampling", "openpi.latents.schema", "openpi.latents.analysis.data.streams"):
        assert "openpi.shared.record_keys" in graph[user], user
    from openpi.latents import schema
    from openpi.models import sampling
    from openpi.shared import record_keys

    assert schema.RECORD_KEYS is record_keys.RECORD_KEYS and sampling.STEP_KEYS is record_keys.STEP_KEYS
    assert set(record_keys.STEP_KEYS) <= set(record_keys.RECORD_KEYS)
    assert all(k.meaning for k in record_keys.RECORD_KEYS.values())
    # the stored attention keys are the model's key groups, each once
    assert record_keys.ATTENTION_KEYS == tuple(f"attention_to_{g}" for g in sampling.ATTENTION_KEY_GROUPS)


_READ_SCRIPT = """
import json, sys
import expert_data_utils as edu
data = edu.load_inference_task_data(sys.argv[1], task_id=3)
mask = data["episodes"]["episode_0"]["rollout_steps"]["step_5"]["text_mask"]
heavy = sorted(m for m in sys.modules if m.startswith(tuple(sys.argv[2].split(","))))
print(json.dumps({"mask": mask.tolist(), "heavy": heavy}))
"""


def test_reading_a_store_imports_no_model_policy_env_or_jax(tmp_path):
    root = tmp_path / "store"
    task = {"task_id": 3, "task_name": "t", "suite": "libero_goal", "language": "put the bowl on the plate"}
    mask = np.array([[True, True, False, False]])
    with store.LatentStoreWriter.create_or_open(root, {"arguments": {}}, resume=False) as writer:
        ep = writer.begin_episode(task, 0)
        for t in (0, 5):
            ep.append_step({"t": t, "prompt": task["language"], "text_mask": mask if t else ~mask})
        ep.finish({"success": True})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", _READ_SCRIPT, str(root), ",".join(HEAVY)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["mask"] == mask.tolist()  # the step_5 row, not step_0's inverted mask
    assert out["heavy"] == [], f"reading a store imported {out['heavy']}"


def _imports_anywhere(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, module) of every import in `path`: module level, function bodies and TYPE_CHECKING blocks alike.

    ``from pkg import name`` yields ``pkg.name`` as well as ``pkg`` (``name`` may be a submodule).
    """
    module = _module_name(path) if path.is_relative_to(SRC) else path.stem
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(module, path.name == "__init__.py", node)
            out += [(node.lineno, base)] + [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return out


ENVS = OPENPI / "envs"
# The simulator modules: everything in openpi/envs but the package (the registry), the protocol and the
# simulator-agnostic env worker process (it gets its simulator from the registry by name).
SIMULATOR_MODULES = sorted(
    f"openpi.envs.{p.stem}" for p in ENVS.glob("*.py") if p.stem not in ("__init__", "base", "worker")
)


def test_simulators_are_reached_only_through_the_registry():
    """Outside openpi/envs, code (src/, scripts/, benchmarks/) names a simulator with `openpi.envs.get(name)`, never by
    importing its module; tests may (they test a simulator itself or patch its env class)."""
    assert "openpi.envs.libero" in SIMULATOR_MODULES
    files = [p for p in SRC.rglob("*.py") if not p.is_relative_to(ENVS)]
    files += [*(REPO / "scripts").glob("*.py"), *(REPO / "benchmarks").glob("*.py")]
    bad = [
        f"{p.relative_to(REPO)}:{line} imports {name}"
        for p in files
        for line, name in _imports_anywhere(p)
        if name in SIMULATOR_MODULES
    ]
    assert not bad, bad


def test_envs_import_nothing_from_models_latents_policies():
    _assert_kept("envs-standalone")


def test_every_simulator_module_is_registered_and_the_registry_names_the_valid_ones():
    assert sorted(envs.SIMULATORS.values()) == SIMULATOR_MODULES
    for name, module in envs.SIMULATORS.items():
        sim = envs.get(name)
        assert isinstance(sim, base.Simulator) and sim.name == name
        assert sim is importlib.import_module(module).SIMULATOR
    with pytest.raises(ValueError, match=r"Unknown simulator 'libro'; registered simulators: libero"):
        envs.get("libro")


def test_collection_env_and_policy_modules_stay_small():
    """The issue's size rule for the packages this layout introduced: no module over ~400 lines."""
    packages = (OPENPI / "envs", OPENPI / "policies", OPENPI / "latents" / "collect")
    sizes = {str(p.relative_to(SRC)): len(p.read_text().splitlines()) for d in packages for p in d.glob("*.py")}
    assert {k: n for k, n in sizes.items() if n > 420} == {}


def test_models_import_nothing_from_latents_policies_envs():
    _assert_kept("models-standalone")


def test_analysis_and_report_import_nothing_from_policies_or_envs():
    """Camera validity and model sizes come from what the store recorded, not from rebuilding policies."""
    _assert_kept("analysis-report-no-policies-envs")


def test_metric_registry_entries_are_complete_and_the_report_covers_them():
    from openpi.latents.analysis import analyze_collection
    from openpi.latents.analysis.data.embedding import TokenEmbedding
    from openpi.latents.analysis.data.streams import STREAMS
    from openpi.latents.analysis.metrics import registry
    from openpi.latents.report import json_report, markdown, plots

    names = [m.name for m in registry.REGISTRY]
    assert len(names) == len(set(names)), names
    for m in registry.REGISTRY:
        assert m.name and m.definition and m.label and m.higher_means, m
        assert m.streams and set(m.streams) <= set(STREAMS), m
        assert callable(m.compute) and m.scope in ("block", "episode", "pooled"), m
    assert set(plots.LABELS) == set(names) and set(plots.CURVE_METRICS) <= set(names)

    # A two-step, two-episode collection in memory with every stream and a counterfactual rerun.
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((16, 4)).astype(np.float32)

    def step(t: int, i: int, k: int) -> dict:
        ids = np.array([[1 + t, 2, 3, 0]], np.int32)
        rec = {
            "text_mask": np.array([[True, True, True, False]]),
            "tokenized_prompt": ids,
            "text_only_hidden_states": rng.standard_normal((2, 1, 4, 4)).astype(np.float32),
            "expert_0_segment_means": rng.standard_normal((2, 1, 3, 4)).astype(np.float32),
            "segment_mask": np.array([[True, False, True]]),
            "expert_1_segment_means": rng.standard_normal((2, 2, 1, 2, 4)).astype(np.float32),
            "attention_to_text": rng.uniform(0, 1, (2, 2, 1, 2, 3)).astype(np.float32),
            "attention_to_text_content": rng.uniform(0, 0.5, (2, 2, 1, 2, 3)).astype(np.float32),
            "attention_to_bos": rng.uniform(0, 0.5, (2, 2, 1, 2, 3)).astype(np.float32),
            "attention_key_counts": np.broadcast_to(np.float32([9, 3, 1, 1]), (2, 1, 2, 3, 4)).copy(),
            "denoise_times": np.array([1.0, 0.5], np.float32),
            "actions": rng.standard_normal((2, 3)).astype(np.float32),
        }
        cf = {f"cf_{k}": v for k, v in rec.items() if k != "denoise_times" and not k.startswith("attention_")}
        # a different prompt (first token), one per episode: prompt decoding needs two distinct rerun prompts a task
        cf["cf_tokenized_prompt"] = ids + np.array([[8 + 4 * k, 0, 0, 0]], np.int32)
        return {**rec, **cf}

    tasks = {
        t: {
            "task_id": t,
            "episodes": {
                f"episode_{k}": {
                    "metadata": {"success": k == 0},
                    "rollout_steps": {f"step_{5 * i}": step(t, i, k) for i in range(2)},
                }
                for k in range(2)
            },
        }
        for t in range(2)
    }
    res = analyze_collection(tasks, embedding=TokenEmbedding(emb, np.zeros(4, np.float32), "test"), probe=False)
    for m in registry.REGISTRY:
        if m.scope == "pooled":  # collection-level: one entry per stored layer in res.pooled (values may be NaN here)
            assert {(s, m.name) in res.pooled for s in m.streams} == {True}, f"{m.name} not computed for {m.streams}"
        else:
            assert {res.has(s, m.name) for s in m.streams} == {True}, f"{m.name} not computed for {m.streams}"
    data = json_report.metrics_json(res)
    assert set(names) <= set(data["definitions"]) and set(names) <= set(data["metrics"])
    assert all(
        data["metrics"][n][s]["per_layer"] is not None for m in registry.REGISTRY for n, s in [(m.name, m.streams[0])]
    )
    figures = {name: {"file": f"{name}.png"} for name in plots.FIGURES}
    md = markdown.report_md(res, figures, data["language_loss"])
    assert all(f"* **{n}**: " in md for n in names)


def test_import_linter_reads_every_contract_and_catches_a_planted_violation(tmp_path):
    config = _importlinter_api.read_configuration(str(REPO / "pyproject.toml"))
    assert tuple(c["id"] for c in config["contracts_options"]) == CONTRACTS
    planted = tmp_path / "planted.toml"  # the report reads the analysis: forbidding it must be reported broken
    planted.write_text(
        '[tool.importlinter]\nroot_packages = ["openpi"]\n[[tool.importlinter.contracts]]\nid = "planted"\n'
        'name = "planted"\ntype = "forbidden"\nsource_modules = ["openpi.latents.report"]\n'
        'forbidden_modules = ["openpi.latents.analysis"]\n'
    )
    assert use_cases.lint_imports(str(planted), cache_dir=None, no_logo=True) is False
