"""Prompt lists: which normal image(s) each category or each test image is compared with.

The official MetaUAS evaluation does not draw its prompts: it reads them from list files that
ship with the code (method spec ``metauas.md`` §6), one of two kinds, both with image paths
**relative to the dataset root** (the official ``--image_dir``):

* **per class** (``data/<set>/oneprompt_seed{N}.json``, MetaUAS): one JSON object, category ->
  the normal prompt of that category, the same for every test image::

      {"bottle": {"filename": "bottle/train/good/134.png", "label": 0,
                  "label_name": "good", "clsname": "bottle"}, ...}

  Other keys of an entry are ignored, except that ``label`` (when present) must be 0 and
  ``clsname`` (when present) must be the category. Also accepted (our extension): the path as
  a bare string (``{"bottle": "bottle/train/good/134.png"}``), or a non-empty list of such
  entries or strings (k prompts for the category, in the given order).
* **per query** (``data/<set>/test-train-top10pair-eb4.json``, MetaUAS★): JSON lines, one
  object per line, test image -> its retrieved normal images, best first; the official code
  uses only the first::

      {"bottle/test/broken_large/002.png": ["bottle/train/good/153.png", ...]}

  Also accepted: the same mapping as one JSON object (over several lines or one), and a bare
  string instead of the list.

The kind is decided by the content, not the file name (the official ``dataset.py`` looks for
``oneprompt_seed`` in the name): keys that are image paths (an image extension,
``IMAGE_EXTENSIONS``) make a per-query list, keys that are not make a per-class list. Anything
else (malformed JSON, another structure, duplicate keys, a mix of both kinds of key) is refused
with an error that names the file and the problem.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from anomalens.data.io import IMAGE_EXTENSIONS
from anomalens.types import Sample

__all__ = [
    "PROMPT_LIST_KINDS",
    "SEED_FIELD",
    "PromptList",
    "check_prompt_list",
    "class_prompts",
    "pair_queries",
    "prompt_list_file",
    "read_prompt_list",
]

log = logging.getLogger(__name__)

PromptListKind = Literal["per_class", "per_query"]
PROMPT_LIST_KINDS: tuple[str, ...] = ("per_class", "per_query")
#: placeholder of a seed-templated list name: ``lists/oneprompt_seed{seed}.json``
SEED_FIELD = "{seed}"
#: how many problems an error message names before "and N more"
_SHOWN = 8


@dataclass(frozen=True)
class PromptList:
    """A parsed prompt-list file.

    Attributes:
        path: the file.
        sha256: hex digest of its bytes (recorded with the results).
        kind: ``per_class`` (category -> prompts) or ``per_query`` (test image -> prompts).
        entries: key -> prompt paths as written in the file (relative to the dataset root,
            or absolute). ``per_class``: every listed prompt is used; ``per_query``: the
            ranked list, only the first is used.
    """

    path: Path
    sha256: str
    kind: PromptListKind
    entries: Mapping[str, tuple[str, ...]]

    def record(self) -> dict[str, str]:
        """What results record about the list: ``path``, ``sha256`` and ``kind``."""
        return {"path": str(self.path), "sha256": self.sha256, "kind": self.kind}


def prompt_list_file(template: str | Path, seed: int | None) -> Path:
    """The list file of one seed: ``{seed}`` in ``template`` replaced by the seed.

    A template without ``{seed}`` is one file for every seed.

    Raises:
        ValueError: a ``{seed}`` template without a seed.
    """
    text = str(template)
    if SEED_FIELD not in text:
        return Path(text)
    if seed is None:
        raise ValueError(f"prompt list {text} names a file per seed ({SEED_FIELD}) but no seed")
    return Path(text.replace(SEED_FIELD, str(int(seed))))


def _no_duplicates(path: Path, where: str) -> Any:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for k, v in pairs:
            if k in seen:
                raise ValueError(f"prompt list {path}{where}: key {k!r} appears twice")
            seen[k] = v
        return seen

    return hook


def _parse(path: Path, text: str) -> dict[str, Any]:
    """The file as one mapping: a JSON object, or JSON lines (one object per line) merged."""
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates(path, ""))
    except json.JSONDecodeError as exc:
        if exc.msg != "Extra data":
            raise ValueError(
                f"prompt list {path}: not valid JSON (line {exc.lineno}, column {exc.colno}: "
                f"{exc.msg})"
            ) from None
    else:
        if not isinstance(data, dict):
            raise ValueError(
                f"prompt list {path}: expected a JSON object (category -> prompt, or test "
                f"image -> prompts) or JSON lines of such objects, got a {type(data).__name__}"
            )
        return data
    merged: dict[str, Any] = {}
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line, object_pairs_hook=_no_duplicates(path, f", line {n}"))
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"prompt list {path}, line {n}: not valid JSON (column {exc.colno}: {exc.msg}); "
                "JSON lines need one complete object per line"
            ) from None
        if not isinstance(obj, dict):
            raise ValueError(
                f"prompt list {path}, line {n}: expected a JSON object "
                f"{{test image: [prompts]}}, got a {type(obj).__name__}"
            )
        for k, v in obj.items():
            if k in merged:
                raise ValueError(f"prompt list {path}, line {n}: {k!r} is listed twice")
            merged[k] = v
    return merged


def _is_image_path(key: str) -> bool:
    return Path(key).suffix.lower() in IMAGE_EXTENSIONS


def _class_entry(path: Path, category: str, item: Any) -> str:
    """One prompt of a per-class list: a path string or ``{"filename": ..., ...}``."""
    where = f"prompt list {path}, category {category!r}"
    if isinstance(item, str):
        value = item
    elif isinstance(item, dict):
        filename = item.get("filename")
        if not isinstance(filename, str):
            raise ValueError(
                f'{where}: an entry needs a "filename" string (the prompt image, relative to '
                f"the dataset root); got keys {', '.join(map(repr, item)) or '(none)'}"
            )
        value = filename
        if "label" in item and item["label"] not in (0, "0"):
            raise ValueError(
                f"{where}: {value} has label {item['label']!r}; prompts must be normal (label 0)"
            )
        if "clsname" in item and item["clsname"] != category:
            raise ValueError(f"{where}: the entry names class {item['clsname']!r}")
    else:
        raise ValueError(
            f'{where}: expected {{"filename": PATH, ...}}, a path string or a list of them; '
            f"got a {type(item).__name__}"
        )
    if not value.strip():
        raise ValueError(f"{where}: empty prompt path")
    return value


def _query_entry(path: Path, query: str, value: Any) -> tuple[str, ...]:
    where = f"prompt list {path}, test image {query!r}"
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ValueError(
            f"{where}: expected a non-empty list of prompt paths (best first) or one path; "
            f"got {type(value).__name__ if value != [] else 'an empty list'}"
        )
    bad = [x for x in items if not isinstance(x, str) or not x.strip()]
    if bad:
        raise ValueError(f"{where}: prompt paths must be non-empty strings, got {bad[0]!r}")
    return tuple(items)


def read_prompt_list(path: str | Path) -> PromptList:
    """Read and check the structure of a prompt-list file (see the module docstring).

    Only the structure is checked here; whether the listed files exist under the dataset root
    is :func:`check_prompt_list`'s job.

    Raises:
        FileNotFoundError: the file does not exist or cannot be read.
        ValueError: malformed JSON or an unexpected structure; the message names the file, the
            line or key, and what was expected.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise FileNotFoundError(f"prompt list {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"prompt list {path}: not UTF-8 text ({exc.reason})") from None
    if not text.strip():
        raise ValueError(f"prompt list {path} is empty")
    data = _parse(path, text)
    if not data:
        raise ValueError(f"prompt list {path} lists nothing")
    image_keys = [k for k in data if _is_image_path(k)]
    entries: dict[str, tuple[str, ...]] = {}
    kind: PromptListKind
    if len(image_keys) == len(data):
        kind = "per_query"
        for k, v in data.items():
            entries[k] = _query_entry(path, k, v)
    elif not image_keys:
        kind = "per_class"
        for k, v in data.items():
            items = v if isinstance(v, list) else [v]
            if not items:
                raise ValueError(f"prompt list {path}, category {k!r}: empty list of prompts")
            entries[k] = tuple(_class_entry(path, k, x) for x in items)
    else:
        other = next(k for k in data if not _is_image_path(k))
        raise ValueError(
            f"prompt list {path} mixes test-image keys ({image_keys[0]!r}) with other keys "
            f"({other!r}): a list is either category -> prompt or test image -> prompts"
        )
    return PromptList(path, hashlib.sha256(raw).hexdigest(), kind, entries)


def _resolve(root: Path, rel: str) -> Path:
    return root / rel  # an absolute path in the list stays as it is


def _first_part(rel: str) -> str:
    parts = Path(rel).parts
    return parts[0] if parts else ""


def _shown(items: Sequence[str]) -> str:
    more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more


def class_prompts(plist: PromptList, root: str | Path, category: str) -> list[Sample]:
    """The prompts a per-class list gives ``category``, as normal samples, in listed order.

    Raises:
        ValueError: the list is per query, or does not list the category.
    """
    if plist.kind != "per_class":
        raise ValueError(f"prompt list {plist.path} gives a prompt per test image, not per class")
    if category not in plist.entries:
        raise ValueError(
            f"prompt list {plist.path} has no entry for category {category!r}; it lists "
            f"{_shown(sorted(plist.entries))}"
        )
    root = Path(root)
    return [
        Sample(_resolve(root, rel), 0, None, category, "good", "train")
        for rel in plist.entries[category]
    ]


def _query_table(plist: PromptList, root: Path) -> dict[Path, str]:
    return {_resolve(root, k).resolve(): k for k in plist.entries}


def pair_queries(plist: PromptList, root: str | Path, queries: Sequence[Sample]) -> list[Sample]:
    """``queries`` with ``reference_path`` set to each one's listed prompt (the first listed).

    Raises:
        ValueError: the list is per class, or a query is not listed (all such named).
    """
    if plist.kind != "per_query":
        raise ValueError(f"prompt list {plist.path} gives a prompt per class, not per test image")
    root = Path(root)
    table = _query_table(plist, root)
    out, unlisted = [], []
    for s in queries:
        key = table.get(Path(s.image_path).resolve())
        if key is None:
            unlisted.append(_rel(s.image_path, root))
            continue
        out.append(replace(s, reference_path=_resolve(root, plist.entries[key][0])))
    if unlisted:
        raise ValueError(
            f"prompt list {plist.path} gives no prompt for {len(unlisted)} test image(s) under "
            f"{root}: {_shown(unlisted)} (keys are paths relative to the dataset root)"
        )
    return out


def _rel(path: str | Path, root: Path) -> str:
    try:
        return Path(path).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


def check_prompt_list(
    plist: PromptList, root: str | Path, tests: Mapping[str, Sequence[Sample]]
) -> None:
    """Check a list against the dataset before any work: everything needed is listed and exists.

    Per class: every category of ``tests`` is listed and its prompts exist. Per query: every
    test image of ``tests`` is listed and its (first) prompt exists; listed test images that
    do not exist are reported too when their path starts with one of the categories (the
    MVTec / VisA layouts). Entries of other categories are not looked at. A prompt that is one
    of the category's test images is logged as a warning (it leaks a query into the prompts).

    Args:
        plist: the parsed list.
        root: the dataset root the listed paths are relative to.
        tests: category -> the test samples that will be scored.

    Raises:
        ValueError: names the file and every problem (the first few of each kind).
    """
    root = Path(root)
    problems: list[str] = []
    missing: list[str] = []
    leaks: list[str] = []
    if plist.kind == "per_class":
        absent = [c for c in tests if c not in plist.entries]
        if absent:
            problems.append(
                f"no entry for categor{'y' if len(absent) == 1 else 'ies'} {_shown(absent)} "
                f"(it lists {_shown(sorted(plist.entries))})"
            )
        for cat, samples in tests.items():
            test_paths = {Path(s.image_path).resolve() for s in samples}
            for rel in plist.entries.get(cat, ()):
                p = _resolve(root, rel)
                if not p.is_file():
                    missing.append(f"{rel} ({cat})")
                elif p.resolve() in test_paths:
                    leaks.append(rel)
    else:
        table = _query_table(plist, root)
        unlisted: list[str] = []
        used: set[str] = set()
        absent_prompts: dict[str, int] = {}  # prompt -> how many test images it is listed for
        for cat, samples in tests.items():
            test_paths = {Path(s.image_path).resolve() for s in samples}
            for s in samples:
                key = table.get(Path(s.image_path).resolve())
                if key is None:
                    unlisted.append(_rel(s.image_path, root))
                    continue
                used.add(key)
                prompt = plist.entries[key][0]
                p = _resolve(root, prompt)
                if not p.is_file():
                    absent_prompts[prompt] = absent_prompts.get(prompt, 0) + 1
                elif p.resolve() in test_paths:
                    leaks.append(prompt)
            for key in plist.entries:
                if key not in used and _first_part(key) == cat and not (root / key).is_file():
                    missing.append(f"{key} (test image)")
        missing = [
            f"{p} (prompt of {n} test image{'s' if n > 1 else ''})"
            for p, n in absent_prompts.items()
        ] + missing
        if unlisted:
            problems.append(f"no prompt for {len(unlisted)} test image(s): {_shown(unlisted)}")
    if missing:
        problems.append(
            f"{len(missing)} listed image(s) do not exist under {root}: {_shown(missing)}"
        )
    if problems:
        raise ValueError(
            f"prompt list {plist.path}: "
            + "; ".join(problems)
            + " (paths in a prompt list are relative to the dataset root, --root)"
        )
    if leaks:
        log.warning(
            "prompt list %s: %d prompt(s) are test images of their category (a query used as "
            "its own or another query's prompt): %s",
            plist.path,
            len(leaks),
            _shown(sorted(set(leaks))),
        )
