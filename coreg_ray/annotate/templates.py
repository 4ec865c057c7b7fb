"""Prompt templates and class names for CLIP annotation.

- `SMALL_TEMPLATES`: the 27 "imagenet_templates_small" prompts, the paper's default. They are
  written exactly as in the authors' annotation code (no final full stop).
- `IMAGENET_TEMPLATES`: the 80 prompts of CLIP's ImageNet prompt-engineering notebook.
- `resolve_templates(spec)`: "small" | "imagenet" | a text file (one template per line, blank
  lines and lines starting with '#' ignored) | a list of strings.
- `resolve_classes(spec)`: a list | a classes.json / .txt file | "svhn" | "gtsrb" |
  "gtsrb:FILE" | "prefix:TEXT:FILE" (see the function).

Every template must contain exactly one "{}" (the class name); class lists must be non-empty,
without blank or repeated names. Violations raise `CoregError` with a one-line message.
"""
from __future__ import annotations

import json
import string
from pathlib import Path

from coreg_ray.errors import CoregError

SMALL_TEMPLATES: list[str] = [
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
]

IMAGENET_TEMPLATES: list[str] = [
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
]

TEMPLATE_SETS: dict[str, list[str]] = {
    "small": SMALL_TEMPLATES,
    "imagenet_templates_small": SMALL_TEMPLATES,
    "imagenet": IMAGENET_TEMPLATES,
    "imagenet80": IMAGENET_TEMPLATES,
    "imagenet_templates": IMAGENET_TEMPLATES,
}

# The 43 GTSRB classes in label order (short English names of the German traffic signs).
GTSRB_NAMES: list[str] = [
    "Speed limit 20", "Speed limit 30", "Speed limit 50", "Speed limit 60", "Speed limit 70",
    "Speed limit 80", "Speed limit 80 cancelled", "Speed limit 100", "Speed limit 120",
    "No passing", "No truck overtaking", "Only have priority at the next intersection",
    "Priority road", "Give way", "Stop", "All vehicles prohibited", "Trucks prohibited",
    "No entry", "Caution!", "Curve (to the left)", "Curve (to the right)", "Continuous curves",
    "Rough road", "Slippery road", "The road narrows on the right", "Construction site",
    "Signal light", "Pay attention to pedestrians", "Pay attention to children",
    "Watch out for bikes", "Watch out for snow/ice on the road", "Deer ahead",
    "Unlimited speed", "Turn right", "Turn left", "Go straight", "Go straight and turn right",
    "Go straight and turn left", "Drive on the right", "Drive on the left",
    "Driving around the island", "Lift ban on no passing", "Lift ban on truck overtaking",
]
GTSRB_PREFIX = "German Traffic Sign: "


# ----------------------------------------------------------------------------- templates
def template_list(templates, source: str) -> list[str]:
    """A non-empty list of templates (one string is refused: it is not a list), one line if not."""
    if isinstance(templates, str):
        raise CoregError(f"{source}: expected a list of templates, got one string")
    templates = list(templates)
    if not templates:
        raise CoregError(f"{source}: no templates")
    return templates


def validate_templates(templates, source: str = "templates") -> list[str]:
    """Check every template has exactly one "{}" and no other format field; return a list."""
    templates = template_list(templates, source)
    for i, t in enumerate(templates, 1):
        if not isinstance(t, str):
            raise CoregError(f"{source}: template {i} is {type(t).__name__}, not a string")
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(t) if f is not None]
        except ValueError as exc:  # unbalanced braces
            raise CoregError(f"{source}: template {i} {t!r} is not a valid format string ({exc})")
        if fields != [""]:
            what = "has no '{}' placeholder" if not fields else \
                f"must contain exactly one '{{}}' placeholder (has {', '.join('{' + f + '}' for f in fields)})"
            raise CoregError(f"{source}: template {i} {t!r} {what} for the class name")
    return templates


def load_templates(path: str | Path) -> list[str]:
    """A user template file: one template per line; blank lines and '#' comments are skipped."""
    path = Path(path)
    if not path.is_file():
        raise CoregError(f"template file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise CoregError(f"{path}: not UTF-8 text ({exc})")
    templates = []
    for n, line in enumerate(lines, 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        try:
            validate_templates([s], f"{path}:{n}")
        except CoregError as exc:
            raise CoregError(str(exc).replace("template 1 ", "template ")) from None
        templates.append(s)
    if not templates:
        raise CoregError(f"{path}: no templates (one per line, '{{}}' marks the class name)")
    return templates


def resolve_templates(spec=None) -> list[str]:
    """None/"small" -> 27 templates; "imagenet" -> 80; a file path; or a list of templates."""
    if spec is None:
        return list(SMALL_TEMPLATES)
    if isinstance(spec, (list, tuple)):
        return validate_templates(spec)
    key = str(spec)
    if key.lower() in TEMPLATE_SETS:
        return list(TEMPLATE_SETS[key.lower()])
    if Path(key).is_file():
        return load_templates(key)
    raise CoregError(f"templates {key!r}: not a file and not one of "
                     f"{', '.join(sorted(TEMPLATE_SETS))}")


# ----------------------------------------------------------------------------- classes
def validate_classes(classes, source: str = "classes") -> list[str]:
    if classes is None or isinstance(classes, str):
        raise CoregError(f"{source}: expected a list of class names")
    classes = list(classes)
    if not classes:
        raise CoregError(f"{source}: empty class list")
    seen = {}
    for i, c in enumerate(classes):
        if not isinstance(c, str) or not c.strip():
            raise CoregError(f"{source}: class {i} is empty or not a string ({c!r})")
        if c in seen:
            raise CoregError(f"{source}: class name {c!r} appears twice (classes {seen[c]} and {i})")
        seen[c] = i
    return classes


def svhn_classes() -> list[str]:
    """SVHN digit classes as the paper prompts them: "number 0" .. "number 9"."""
    return [f"number {d}" for d in range(10)]


def gtsrb_classes(names=None) -> list[str]:
    """GTSRB classes as "German Traffic Sign: <name>"; `names` defaults to `GTSRB_NAMES`."""
    names = GTSRB_NAMES if names is None else validate_classes(names, "gtsrb names")
    return prefixed_classes(names, GTSRB_PREFIX)


def prefixed_classes(names, prefix: str) -> list[str]:
    """Prefix every name (names already carrying the prefix are left alone)."""
    return [n if n.startswith(prefix) else prefix + n for n in validate_classes(names)]


def read_class_file(path: str | Path) -> list[str]:
    """classes.json (a JSON list) or a text file with one class name per line."""
    path = Path(path)
    if not path.is_file():
        raise CoregError(f"class file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            names = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CoregError(f"{path}: not valid JSON ({exc})")
        return validate_classes(names, str(path))
    return validate_classes([s.strip() for s in text.splitlines() if s.strip()], str(path))


def resolve_classes(spec, default=None) -> list[str]:
    """Class names for prompting.

    spec: None (use `default`, e.g. the image table's classes.json) | a list | a .json/.txt
    file | "svhn" | "gtsrb" (43 built-in names) | "gtsrb:FILE" (your names, prefixed) |
    "prefix:TEXT:FILE_OR_NOTHING" (prefix every name of FILE, or of `default`, with TEXT).
    """
    if spec is None:
        if default is None:
            raise CoregError("no class names: pass classes or put classes.json beside the images")
        return validate_classes(default)
    if isinstance(spec, (list, tuple)):
        return validate_classes(spec)
    s = str(spec)
    if s.lower() == "svhn":
        return svhn_classes()
    if s.lower() == "gtsrb":
        return gtsrb_classes()
    if s.lower().startswith("gtsrb:"):
        return gtsrb_classes(read_class_file(s[6:]))
    if s.startswith("prefix:"):
        parts = s.split(":", 2)
        if len(parts) < 2 or not parts[1]:
            raise CoregError(f"classes {s!r}: use prefix:TEXT:FILE or prefix:TEXT")
        names = read_class_file(parts[2]) if len(parts) == 3 and parts[2] else default
        if names is None:
            raise CoregError(f"classes {s!r}: no class file and no default class names")
        return prefixed_classes(names, parts[1])
    return read_class_file(s)


def build_prompts(templates, classes) -> list[list[str]]:
    """prompts[k][c] = templates[k] filled with classes[c]."""
    templates = validate_templates(templates)
    classes = validate_classes(classes)
    return [[t.format(c) for c in classes] for t in templates]
