"""The run manifest: one typed, versioned contract (`openpi.latents.store.manifest.RunManifest`) that every producer
writes and every reader reads; stores of every earlier manifest format still open, read and resume."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import tarfile

import numpy as np
import pytest

from openpi.latents import store, text_latent
from openpi.latents.analysis.compare import behaviour
from openpi.latents.analysis.data import labels, streams
from openpi.latents.store import manifest as manifest_lib
from openpi.latents.store.manifest import MANIFEST_VERSION, RunManifest

REPO = pathlib.Path(__file__).resolve().parents[1]
LEGACY_FIXTURE = REPO / "tests" / "fixtures" / "legacy_store_v1.tar.gz"
TINY_CONFIG = "Pi0Config(paligemma=dummy, action_expert=dummy, siglip=mu/14, vocab=1024, horizon=50)"

# The manifest the first collection wrote (commit 0ec8a18, `collection._manifest`): no condition, no suffix layout,
# no version.
FIRST_COLLECTION = {
    "kind": "pi0 LIBERO latent collection",
    "arguments": {"preset": "pi0_libero_tiny", "num_denoise_steps": 4, "seed": 7, "checkpoint": None},
    "capture_spec": {"expert_0": "full", "layers": [0, -1], "denoise_steps": None},
    "checkpoint": "random(seed=0)",
    "preset": "pi0_libero_tiny",
    "model_config": TINY_CONFIG,
    "suite": "libero_goal",
    "max_steps": 300,
    "text_start": 768,
    "segment_names": ["base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb", "text"],
    "code_version": "git:0ec8a18",
    "created": "2026-11-25T18:43:33+00:00",
    "content_hash": "sha256:00",
}
# The server's manifest before this type: "intervention" written as null when there was none.
OLD_SERVER = {
    "kind": "pi0 latent policy server",
    "arguments": {"preset": "pi0_libero_tiny", "num_denoise_steps": 10, "intervention": None},
    "capture_spec": {"expert_0": "pooled"},
    "checkpoint": "random(seed=0)",
    "intervention": None,
    "record_fields": {"episode_id": "int"},
    "connections_task_id": 1000000,
    "suffix_segment_names": ["state", "actions"],
}


def test_every_field_round_trips_and_unknown_keys_are_kept():
    full = RunManifest(
        kind="k",
        arguments={"seed": 1, "task_ids": [1, 2]},
        capture_spec={"layers": [0, 3]},
        checkpoint="random(seed=0)",
        preset="pi0_libero_tiny",
        model_config=TINY_CONFIG,
        suite="libero_goal",
        max_steps=9,
        text_start=768,
        segment_names=("base_0_rgb", "text"),
        suffix_segment_names=("state", "actions"),
        condition={"name": "blank", "prompt_mode": "blank", "intervention": None},
        intervention={"kind": "knockout"},
        record_fields={"episode_id": "int"},
        connections_task_id=1000000,
        control_of={"store": "/s", "content_hash": "sha256:1"},
        replay={"model": "random-init"},
        code_version="git:abc",
        created="2026-12-08T00:00:00+00:00",
        content_hash="sha256:2",
        extra={"organism": {"n": 3}},
    )
    data = full.to_json()
    assert RunManifest.from_json(json.loads(json.dumps(data))) == full
    assert data["manifest_version"] == MANIFEST_VERSION == 2 and data["organism"] == {"n": 3}
    assert data["segment_names"] == ["base_0_rgb", "text"]  # JSON lists on disk, tuples in the type
    assert RunManifest.of(full) is full and RunManifest.of(data) == full
    assert not RunManifest.of(None) and not RunManifest() and RunManifest(preset="x")
    with pytest.raises(ValueError, match=r"extra holds \['preset'\]"):
        RunManifest(extra={"preset": "x"})
    # `updated` routes a field's name to the field and anything else to extra (the synthetic collection's extras)
    up = RunManifest(kind="k").updated({"control_of": {"store": "/s"}, "organism": 1})
    assert up.control_of == {"store": "/s"} and up.extra == {"organism": 1}


@pytest.mark.parametrize("old", [FIRST_COLLECTION, OLD_SERVER], ids=["first-collection", "old-server"])
def test_an_earlier_manifest_reads_as_version_1_and_writes_back_as_stored(old):
    m = RunManifest.from_json(old)
    assert m.manifest_version == 1 and "manifest_version" not in m.to_json()
    assert m.to_json() == {k: v for k, v in old.items() if v is not None}  # nulls are left out, nothing else changes
    assert m.kind == old["kind"] and m.argument("num_denoise_steps") == old["arguments"]["num_denoise_steps"]
    # a null and an absent key mean the same to a resume: a store of the old server resumes under the new manifest
    assert manifest_lib.manifest_differences(old, m.to_json()) == []
    assert manifest_lib.manifest_differences(old, {**m.to_json(), "manifest_version": MANIFEST_VERSION}) == []
    assert manifest_lib.manifest_differences(old, {**old, "checkpoint": "other"}) == [
        f'checkpoint: stored "{old["checkpoint"]}", requested "other"'
    ]


def test_readers_take_the_first_collection_manifest():
    """What the analysis reads from the oldest collection manifest: layer ids (negative resolved with the depth of
    the model config), the expert-1 layout (no suffix names: from the model config), the baseline condition."""
    from openpi.models import pi0_config

    depth = pi0_config.Pi0Config.from_description(TINY_CONFIG).depth
    assert labels.resolve_layers(FIRST_COLLECTION, 2) == ((0, depth - 1), "model", None)
    assert labels.resolve_denoise_steps(FIRST_COLLECTION, 4)[:2] == ((0, 1, 2, 3), "model")
    assert streams.suffix_roles(FIRST_COLLECTION) == (True, "manifest model_config")
    # text latents label their layers the same way (the model config is a description string, not a dict)
    assert text_latent._layer_ids(RunManifest.from_json(FIRST_COLLECTION), 2) == (0, depth - 1)

    class OldStore:  # what behaviour reads of a store: its manifest
        run_manifest = RunManifest.from_json(FIRST_COLLECTION)

    assert behaviour._condition_of(OldStore()) == {"name": "baseline", "prompt_mode": "task", "intervention": None}


def test_a_manifest_of_a_newer_version_is_refused_naming_the_fix():
    with pytest.raises(ValueError, match=r"version 3: this code reads versions 1\.\.2.*update openpi"):
        RunManifest.from_json({"manifest_version": 3})
    with pytest.raises(TypeError, match="JSON object"):
        RunManifest.from_json(["kind"])


def test_the_format_1_store_fixture_opens_with_its_manifest(tmp_path):
    """The format-1 store of commit 6f74b7a (tests/make_legacy_store.py): its manifest reads as version 1."""
    with tarfile.open(LEGACY_FIXTURE) as tar:
        tar.extractall(tmp_path, filter="data")
    opened = store.open_store(tmp_path / "legacy_store_v1")
    m = opened.run_manifest
    assert m.manifest_version == 1 and m.checkpoint == "gs://openpi-assets/checkpoints/pi0_libero"
    assert m.capture("expert_0") == "full" and m.capture("layers") is None and m.argument("seed") == 7
    assert m.kind is None and m.condition is None  # written before either existed
    assert m.to_json() == opened.manifest  # the JSON as stored, key for key


def _write(root, manifest) -> None:
    task = {"task_id": 0, "task_name": "t", "suite": "libero_goal", "language": "pick"}
    with store.LatentStoreWriter.create_or_open(root, manifest, resume=False) as writer:
        ep = writer.begin_episode(task, 0)
        ep.append_step({"t": 0, "prompt": "pick", "state": np.zeros(3, np.float32)})
        ep.finish({"success": True})


def test_a_store_of_the_old_format_resumes_under_the_typed_manifest(tmp_path):
    root = tmp_path / "old"
    _write(root, OLD_SERVER)  # written as the old code did: a dict without a version, nulls kept
    stored = json.loads((root / "manifest.json").read_text())
    assert "manifest_version" not in stored and stored["intervention"] is None
    # the same settings, as new code builds them (version 2, no nulls)
    requested = dataclasses.replace(RunManifest.from_json(OLD_SERVER), manifest_version=MANIFEST_VERSION)
    assert store.LatentStoreWriter.check_can_open(root, manifest_lib.complete_manifest(requested), resume=True) == 1
    with pytest.raises(ValueError, match=r"checkpoint: stored \"random\(seed=0\)\", requested \"random\(seed=1\)\""):
        other = requested.updated({"checkpoint": "random(seed=1)"})
        store.LatentStoreWriter.check_can_open(root, manifest_lib.complete_manifest(other), resume=True)


def test_a_new_store_records_the_version_and_no_nulls(tmp_path):
    root = tmp_path / "new"
    m = dataclasses.replace(RunManifest.from_json(OLD_SERVER), manifest_version=MANIFEST_VERSION)
    _write(root, m)
    stored = json.loads((root / "manifest.json").read_text())
    assert stored["manifest_version"] == MANIFEST_VERSION and "intervention" not in stored
    assert store.open_store(root).run_manifest.record_fields == {"episode_id": "int"}


def test_no_module_but_the_manifest_module_reads_manifest_keys():
    """The acceptance grep: `manifest.get(` appears nowhere in src/ or scripts/ outside the manifest module."""
    home = REPO / "src" / "openpi" / "latents" / "store" / "manifest.py"
    files = [*(REPO / "src").rglob("*.py"), *(REPO / "scripts").glob("*.py")]
    assert home in files
    bad = [
        f"{p.relative_to(REPO)}:{i}"
        for p in files
        if p != home
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if "manifest.get(" in line
    ]
    assert not bad, bad
