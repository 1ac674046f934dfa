"""Labels of the stored layers and denoising steps: model ids from the run manifest, else capture positions.

Stored layer / step j is labelled with the model layer / denoising step it holds, resolved from the manifest's
``capture_spec`` (:func:`resolve_layers`, :func:`resolve_denoise_steps`). The model's depth comes from the manifest's
``model_config`` (what ``Pi0Config.describe()`` wrote: its Gemma variants). Pickles carry the run manifest under
``data["manifest"]``; without one (older pickles, plain dicts) the layers are labelled by capture position 0..n-1
unless the stored count equals the depth of every named Gemma variant whose width matches the data, and the analysis
says which (``Stream.layer_note``). Model code is imported inside the functions that need it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from openpi.latents.store.manifest import RunManifest


def model_depth(manifest: RunManifest | Mapping[str, Any]) -> tuple[int | None, str | None]:
    """(depth, name) of the model the manifest's ``model_config`` describes, named by the manifest's preset (else by
    the description); (None, None) when the manifest has no model_config or it names no known configuration."""
    manifest = RunManifest.of(manifest)
    text = manifest.model_config
    if not text:
        return None, None
    from openpi.models import pi0_config

    try:
        depth = pi0_config.Pi0Config.from_description(str(text)).depth
    except ValueError:
        return None, None
    return depth, str(manifest.preset or text)


def variants_of_width(width: int | None) -> list[tuple[str, int]]:
    """[(name, depth)] of the named Gemma variants of this width (the only hint about depth without a manifest)."""
    if width is None:
        return []
    from openpi.models import gemma

    configs = {name: gemma.get_config(name) for name in gemma.variants()}
    return [(name, c.depth) for name, c in configs.items() if c.width == width]


def _by_position(n_stored: int, note: str) -> tuple[tuple[int, ...], str, str]:
    return tuple(range(n_stored)), "capture_position", note


def _from_capture_spec(
    spec: Mapping[str, Any], n_stored: int, depth: int | None, model: str | None
) -> tuple[tuple[int, ...], str, str | None]:
    layers = spec.get("layers")
    if layers is None:
        if depth is None or depth == n_stored:
            return tuple(range(n_stored)), "model", None
        return _by_position(
            n_stored,
            f"capture_spec.layers is None (all layers) but {n_stored} layers are stored and preset {model} has "
            f"{depth}: layers labelled by capture position, not model layer ids",
        )
    if len(layers) != n_stored:
        return _by_position(
            n_stored,
            f"capture_spec.layers lists {len(layers)} layers but {n_stored} are stored: layers labelled by capture "
            "position, not model layer ids",
        )
    if any(int(x) < 0 for x in layers):
        if depth is None:
            return _by_position(
                n_stored,
                f"capture_spec.layers {list(layers)} has negative ids and the model's depth is unknown: layers "
                "labelled by capture position, not model layer ids",
            )
        return tuple(int(x) % depth for x in layers), "model", None
    return tuple(int(x) for x in layers), "model", None


def resolve_layers(
    manifest: RunManifest | Mapping[str, Any], n_stored: int, width: int | None = None
) -> tuple[tuple[int, ...], str, str | None]:
    """(label of each stored layer, "model" | "capture_position", note or None).

    With the manifest's ``capture_spec``: ``layers`` (None = all; negatives resolved with the depth of the manifest's
    ``model_config``) are the model layer ids. Without one (no manifest: older pickles, plain dicts), the stored layers
    are model layers 0..n-1 only if ``n_stored`` equals the depth of the manifest's model, or of every named Gemma
    variant of width ``width`` (what the data implies); otherwise they are labelled by capture position 0..n-1. Every
    case that is not read off a capture_spec comes with a note saying so.
    """
    manifest = RunManifest.of(manifest)
    depth, model = model_depth(manifest)
    spec = manifest.capture_spec
    if isinstance(spec, Mapping):
        return _from_capture_spec(spec, n_stored, depth, model)
    what = "the manifest has no capture_spec" if manifest else "no run manifest (e.g. a pickle written before "
    what += "" if manifest else "pickles stored it, or in-memory task data)"
    candidates = [(model, depth)] if depth is not None else variants_of_width(width)
    if {d for _, d in candidates} == {n_stored}:
        names = ", ".join(n for n, _ in candidates)
        return (
            tuple(range(n_stored)),
            "model",
            f"{what}: the {n_stored} stored layers are taken as all layers of the model (their count equals the "
            f"depth of {names}{'' if depth is not None else f', whose width {width} matches the data'})",
        )
    implied = (
        "; ".join(f"{n} has {d} layers" for n, d in candidates)
        if candidates
        else "no known model variant matches the data"
    )
    return _by_position(
        n_stored,
        f"{what}: the {n_stored} stored layers are labelled by capture position 0..{n_stored - 1}, not model layer "
        f"ids ({implied})",
    )


def resolve_denoise_steps(
    manifest: RunManifest | Mapping[str, Any], n_stored: int
) -> tuple[tuple[int, ...], str, str | None]:
    """(denoising-step id of each captured step, "model" | "capture_position", note or None).

    Ids come from the manifest's ``capture_spec`` (``CaptureSpec.step_indices(num_steps)``, num_steps = the
    manifest's ``arguments.num_denoise_steps``, default 10); step 0 is t = 1.0 (pure noise). Without a usable
    capture_spec the steps are labelled by capture position, with a note.
    """
    from openpi.models.capture import CaptureSpec

    positions = tuple(range(n_stored))
    manifest = RunManifest.of(manifest)
    spec = manifest.capture_spec
    if not isinstance(spec, Mapping):
        return (
            positions,
            "capture_position",
            ("no capture_spec in the manifest: denoising steps labelled by capture position, not step ids"),
        )
    num_steps = int(manifest.argument("num_denoise_steps", 10))
    try:
        ids = CaptureSpec.from_dict(dict(spec)).step_indices(num_steps)
    except (ValueError, TypeError) as e:
        return positions, "capture_position", f"capture_spec unusable ({e}): denoising steps labelled by position"
    if len(ids) != n_stored:
        return (
            positions,
            "capture_position",
            (
                f"capture_spec gives {len(ids)} denoising steps of {num_steps} but {n_stored} are stored: labelled by "
                "capture position"
            ),
        )
    return tuple(int(i) for i in ids), "model", None
