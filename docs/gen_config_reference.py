"""Generate docs/configuration.md from the docstrings of the public configuration surfaces.

    python docs/gen_config_reference.py           # rewrite docs/configuration.md
    python docs/gen_config_reference.py --check   # exit 1 if docs/configuration.md is stale

Descriptions come from the ``Args:`` (and ``Raises:``) sections of ``AdaRoundCallback``
(``lightning_adaround.trainer.callback._AdaRoundCallbackBase``), ``AdaRoundConfig`` and
``adaround()``; types and defaults come from ``inspect.signature`` / ``dataclasses.fields``,
so they cannot drift from the code. A parameter without a docstring entry (or an entry
naming no parameter) is an error: document it in the docstring, then rerun this script.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable, Optional

OUTPUT = Path(__file__).resolve().parent / "configuration.md"

_SECTION = re.compile(r"^(\w[\w ]*):{1,2}\s*$")
_ENTRY = re.compile(r"^(?P<names>[A-Za-z_][\w]*(?:\s*,\s*[A-Za-z_][\w]*)*)\s*:\s*(?P<text>.*)$")


class DocError(Exception):
    """The docstrings and the signatures disagree."""


def _section(doc: str, title: str) -> list[str]:
    """The lines of one Google-style section (``Args:``), dedented; [] if absent."""
    lines = inspect.cleandoc(doc).splitlines()
    for i, line in enumerate(lines):
        if line.strip() == f"{title}:" and not line.startswith(" "):
            body = []
            for following in lines[i + 1:]:
                if following.strip() and not following.startswith(" "):
                    break  # the next section or prose
                body.append(following)
            return textwrap.dedent("\n".join(body)).strip("\n").splitlines()
    return []


def _rst_to_md(text: str) -> str:
    text = re.sub(r"``(.+?)``", r"`\1`", text)
    text = re.sub(r":(?:func|class|meth|attr):`~?([^`]+)`", r"`\1`", text)
    return text


def parse_entries(doc: Optional[str], title: str = "Args") -> list[tuple[list[str], str]]:
    """``[(names, description), ...]`` from a section; ``a, b: text`` documents two names."""
    if not doc:
        return []
    entries: list[tuple[list[str], str]] = []
    for line in _section(doc, title):
        if not line.strip():
            continue
        match = _ENTRY.match(line) if not line.startswith(" ") else None
        if match:
            names = [n.strip() for n in match.group("names").split(",")]
            entries.append((names, match.group("text").strip()))
        elif entries:
            names, text = entries[-1]
            entries[-1] = (names, f"{text} {line.strip()}")
        else:
            raise DocError(f"cannot parse the first line of the {title} section: {line!r}")
    return [(names, _rst_to_md(text)) for names, text in entries]


def render_value(value: Any) -> str:
    """A default as a reader would write it: classes by name, containers element-wise."""
    if isinstance(value, type) or inspect.isfunction(value):
        return value.__name__
    if isinstance(value, tuple):
        inner = ", ".join(render_value(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, list):
        return "[" + ", ".join(render_value(v) for v in value) + "]"
    if isinstance(value, float) and value.is_integer() and abs(value) >= 1000:
        return f"{int(value):_}.0"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 1000:
        return f"{value:_}"
    return repr(value)


def _signature_params(func: Callable[..., Any]) -> dict[str, tuple[str, str]]:
    """name -> (annotation, default) from ``inspect.signature``."""
    out = {}
    for name, p in inspect.signature(func).parameters.items():
        if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        annotation = p.annotation if isinstance(p.annotation, str) else inspect.formatannotation(p.annotation)
        default = "required" if p.default is p.empty else render_value(p.default)
        out[name] = ("" if p.annotation is p.empty else annotation, default)
    return out


def _dataclass_params(cls: type) -> dict[str, tuple[str, str]]:
    """name -> (annotation, default) from ``dataclasses.fields``."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = render_value(f.default)
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = render_value(f.default_factory())  # type: ignore[misc]
        else:
            default = "required"
        annotation = f.type if isinstance(f.type, str) else inspect.formatannotation(f.type)
        out[f.name] = (annotation, default)
    return out


def render_params(owner: str, doc: Optional[str], params: dict[str, tuple[str, str]]) -> list[str]:
    """A bullet per docstring entry, in docstring order, with each name's type and default."""
    entries = parse_entries(doc)
    documented = [n for names, _ in entries for n in names]
    unknown = [n for n in documented if n not in params]
    missing = [n for n in params if n not in documented]
    duplicated = sorted({n for n in documented if documented.count(n) > 1})
    problems = []
    if missing:
        problems.append(f"undocumented parameters {missing}")
    if unknown:
        problems.append(f"documented names that are not parameters {unknown}")
    if duplicated:
        problems.append(f"parameters documented twice {duplicated}")
    if problems:
        raise DocError(f"{owner}: " + "; ".join(problems) + ". Fix the docstring's Args: section.")
    lines = []
    for names, text in entries:
        heads = []
        for name in names:
            annotation, default = params[name]
            kind = [f"`{annotation}`"] if annotation else []
            kind.append("required" if default == "required" else f"default `{default}`")
            heads.append(f"**`{name}`** ({', '.join(kind)})")
        lines.append(f"- {'; '.join(heads)}: {text}")
    return lines


def render_raises(doc: Optional[str]) -> list[str]:
    entries = parse_entries(doc, "Raises")
    if not entries:
        return []
    lines = ["", "Raises:", ""]
    lines += [f"- `{', '.join(names)}`: {text}" for names, text in entries]
    return lines


HEADER = """\
# Configuration reference

<!-- Generated by docs/gen_config_reference.py from the library's docstrings and signatures.
     Do not edit by hand: change the docstring, then run `python docs/gen_config_reference.py`. -->

Every option, its type and its default, generated from the library's own docstrings.
Each rounding option is spelled once, as a field of [`AdaRoundConfig`](#adaroundconfig):
plain PyTorch code passes one to [`adaround()`](#adaround), the Lightning callback takes
one as `config=` (and `bits=` as a shortcut); in LightningCLI YAML it is a mapping under
the callback's `init_args.config` ([Quickstart](quickstart.md#lightningcli-yaml)). Invalid
values are rejected when the object is built, before any calibration data is read (see
[Troubleshooting](troubleshooting.md) for every message).
"""


def render() -> str:
    from lightning_adaround import AdaRoundConfig, adaround
    from lightning_adaround.trainer.callback import _AdaRoundCallbackBase

    parts = [HEADER]
    parts += [
        "## AdaRoundCallback",
        "",
        "`AdaRoundCallback(bits=None, *, config=None, run_on=\"fit_end\", ...)`, imported from",
        "`lightning_adaround` (for `lightning.pytorch`) or from `lightning_adaround.pytorch_lightning`",
        "(for the standalone `pytorch_lightning` package). Both classes take the same arguments:",
        "the rounding options in `config`, the rest below.",
        "",
    ]
    parts += render_params("AdaRoundCallback", _AdaRoundCallbackBase.__doc__, _signature_params(_AdaRoundCallbackBase.__init__))
    parts += render_raises(_AdaRoundCallbackBase.__doc__)
    parts += [
        "",
        "## AdaRoundConfig",
        "",
        "`AdaRoundConfig(...)` from `lightning_adaround`: a frozen dataclass, validated when it is built;",
        "`dataclasses.replace(config, iterations=2_000)` gives a changed (and checked) copy.",
        "`PerChannel`, `PerGroup` and `PerTensor` are importable from `lightning_adaround` too.",
        "",
    ]
    parts += render_params("AdaRoundConfig", AdaRoundConfig.__doc__, _dataclass_params(AdaRoundConfig))
    parts += [
        "",
        "## adaround()",
        "",
        "`adaround(model, calibration_batches, config=None, *, ...)` from `lightning_adaround`:",
        "rounds the model's weights in place and returns an `AdaRoundResult`.",
        "",
    ]
    parts += render_params("adaround", adaround.__doc__, _signature_params(adaround))
    parts += render_raises(adaround.__doc__)
    return "\n".join(parts).rstrip("\n") + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed file is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else ""
        if current != text:
            print(f"{OUTPUT} is stale: run python docs/gen_config_reference.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
