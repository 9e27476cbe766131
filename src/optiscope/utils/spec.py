"""Parse ``name:key=value,key=value`` specs used on the command line (``--model mlp:depth=3,width=64``)."""

from __future__ import annotations

from typing import Any, Iterable

from optiscope.utils.config import parse_scalar


class SpecError(ValueError):
    """A malformed or unknown spec; the message points at the offending token."""


def split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split ``text`` at ``sep`` outside ``[...]``: ``"a=1,b=[2,3]"`` -> ``["a=1", "b=[2,3]"]``."""
    tokens, depth, cur = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == sep and depth == 0:
            tokens.append(cur)
            cur = ""
        else:
            cur += ch
    tokens.append(cur)
    return tokens


def parse_spec(text: str, valid_names: Iterable[str] | None = None, what: str = "spec") -> tuple[str, dict[str, Any]]:
    """``"adam:lr=1e-3,betas=[0.9,0.999]"`` -> ``("adam", {"lr": 0.001, "betas": [0.9, 0.999]})``.

    Commas inside ``[...]`` do not split. Unknown names raise ``SpecError`` listing ``valid_names``.
    """
    if not isinstance(text, str) or not text.strip():
        raise SpecError(f"empty {what}")
    name, _, rest = text.strip().partition(":")
    name = name.strip()
    if valid_names is not None:
        valid = sorted(valid_names)
        if name not in valid:
            raise SpecError(f"unknown {what} {name!r} in {text!r}; valid: {', '.join(valid)}")
    kwargs: dict[str, Any] = {}
    if rest.strip():
        for tok in split_top_level(rest):
            if "=" not in tok or not tok.split("=", 1)[0].strip():
                raise SpecError(f"malformed {what} {text!r}: token {tok!r} is not key=value")
            k, v = tok.split("=", 1)
            kwargs[k.strip()] = parse_scalar(v)
    return name, kwargs
