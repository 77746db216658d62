"""AdaptCLIP prompt wording, as data.

Two kinds of text enter AdaptCLIP:

* the *static anchors* of the visual adapter: every state phrase combined with every template,
  encoded by the frozen text encoder, and averaged (un-normalised) per class;
* the *placeholder* sentence of the textual adapter, whose word positions are replaced by the
  learned context vectors (no class word and no state word).

The lists below follow the official AdaptCLIP code: 7 normal and 4 abnormal states, 21 templates
with ``"a jpeg corrupted photo of the {}."`` listed twice, object word ``"object"``. Sentence
order is state-major (all templates of the first state, then the second state, ...).
"""

from __future__ import annotations

from anomalens.prompts import templates as _templates

__all__ = [
    "ABNORMAL_STATES",
    "NORMAL_STATES",
    "OBJECT_WORD",
    "TEMPLATES",
    "placeholder_prompt",
    "static_sentences",
]

#: Object word used in every static sentence (AdaptCLIP never uses the category name).
OBJECT_WORD = "object"

#: The 7 normal / 4 abnormal state phrases and the 21 templates are WinCLIP's compositional
#: prompt ensemble as anomalib lists it ("a jpeg corrupted photo of the {}." twice: the anchors
#: are means, so the repetition weights it twice, as in the official code).
NORMAL_STATES = _templates.NORMAL_STATES
ABNORMAL_STATES = _templates.ANOMALOUS_STATES
TEMPLATES = _templates.ANOMALIB_TEMPLATES


def static_sentences(object_word: str = OBJECT_WORD) -> tuple[list[str], list[str]]:
    """All static anchor sentences.

    Args:
        object_word: word substituted for the object (default ``"object"``).

    Returns:
        (normal, abnormal) sentence lists: 147 and 84 sentences with the default lists.
    """

    def build(states: tuple[str, ...]) -> list[str]:
        return [t.format(s.format(object_word)) for s in states for t in TEMPLATES]

    return build(NORMAL_STATES), build(ABNORMAL_STATES)


def placeholder_prompt(n_ctx: int = 12, word: str = "X") -> str:
    """Placeholder sentence of the textual adapter: ``n_ctx`` words and a period.

    Tokenised, it gives ``[SOS, w_1 .. w_n_ctx, '.', EOS, pad ...]``; positions 1..n_ctx are then
    replaced by the learned context vectors.
    """
    if n_ctx < 1:
        raise ValueError(f"n_ctx must be >= 1, got {n_ctx}")
    return " ".join([word] * n_ctx) + "."
