"""Prompt wording as data: WinCLIP's compositional prompt ensemble (CPE).

A prompt is ``template.format(state.format(object_name))``. The normal class uses 7 state
phrases, the anomalous class 4; each is combined with every template (22 in the paper, or the
21-entry list used by anomalib, which repeats one template and misses two).
"""

from __future__ import annotations

from typing import Literal

__all__ = [
    "ANOMALIB_TEMPLATES",
    "ANOMALOUS_STATES",
    "NORMAL_STATES",
    "PAPER_TEMPLATES",
    "TemplateSet",
    "compositional_prompts",
    "get_templates",
    "object_name_from_category",
]

TemplateSet = Literal["paper22", "anomalib21"]

#: State phrases of a normal object; ``{}`` is the object name.
NORMAL_STATES: tuple[str, ...] = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)

#: State phrases of an anomalous object; ``{}`` is the object name.
ANOMALOUS_STATES: tuple[str, ...] = (
    "damaged {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)

#: The 22 distinct templates of the WinCLIP paper; ``{}`` is the state phrase.
PAPER_TEMPLATES: tuple[str, ...] = (
    "a cropped photo of the {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a dark photo of a {}.",
    "a jpeg corrupted photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
)

#: anomalib's 21-entry list: lacks "a cropped photo of a {}." and "a jpeg corrupted photo of
#: a {}.", and lists "a jpeg corrupted photo of the {}." twice (so it weighs double).
ANOMALIB_TEMPLATES: tuple[str, ...] = (
    "a cropped photo of the {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a dark photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
)

_TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "paper22": PAPER_TEMPLATES,
    "anomalib21": ANOMALIB_TEMPLATES,
}


def get_templates(name: str) -> tuple[str, ...]:
    """Template list by name: ``"paper22"`` (default of WinCLIP here) or ``"anomalib21"``."""
    try:
        return _TEMPLATE_SETS[name]
    except KeyError:
        raise ValueError(
            f"unknown template set {name!r} (option 'templates'). "
            f"Available: {', '.join(sorted(_TEMPLATE_SETS))}"
        ) from None


def object_name_from_category(category: str) -> str:
    """Turn a dataset category folder name into prompt text: ``"metal_nut"`` -> ``"metal nut"``.

    An empty name falls back to ``"object"``.
    """
    name = category.replace("_", " ").strip()
    return " ".join(name.split()) or "object"


def compositional_prompts(
    object_name: str,
    states: tuple[str, ...] | list[str],
    templates: tuple[str, ...] | list[str],
) -> list[str]:
    """All state x template prompts for one class (state-major order).

    Args:
        object_name: word(s) naming the object, e.g. ``"bottle"``.
        states: state phrases with one ``{}`` for the object name.
        templates: templates with one ``{}`` for the state phrase.

    Returns:
        ``len(states) * len(templates)`` prompt strings.
    """
    if not object_name.strip():
        raise ValueError("object_name must not be empty (option 'class_name')")
    if not states or not templates:
        raise ValueError("need at least one state phrase and one template")
    for text in (*states, *templates):
        if text.count("{}") != 1:
            raise ValueError(f"prompt pieces need exactly one '{{}}' placeholder, got {text!r}")
    return [t.format(s.format(object_name)) for s in states for t in templates]
