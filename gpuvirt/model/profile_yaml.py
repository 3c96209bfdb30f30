"""Reading profile documents safely (pure): bounded YAML, errors with file and line.

Profile files come from operators and from other tools (NVIDIA's mig-parted and vgpu-device-manager
configs), so nothing in them is trusted: the text is at most :data:`MAX_TEXT_BYTES` (the service layer reads
no more than that from disk), mappings and lists nest at most :data:`MAX_DEPTH` levels (a deeper document
would exhaust the parser's recursion - "internal error" - long before it could mean anything), duplicate
keys are refused (YAML would silently keep the last one, dropping a config) and every error names the file
and the line of the offending key.

Used by :mod:`gpuvirt.model.profile_formats`; never opens files.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import yaml

from gpuvirt.errors import ProfileError

MAX_TEXT_BYTES = 16 * 1024 * 1024     # a profile file; NVIDIA's largest published config is about 60 KB
MAX_DEPTH = 32                        # nesting of mappings and lists; the formats need 5
MAX_CONFIGS = 4096                    # named configs / profiles in one document
MAX_ENTRIES = 1024                    # entries of one config / profile
MAX_NAMES = 256                       # names in one count mapping (mig-devices, vgpu-devices, ...)


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and documents nested deeper than MAX_DEPTH."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:  # type: ignore[override]
        # the composer recurses once per level; counting here stops a deep document before Python's
        # recursion limit does (the scanner and parser underneath keep explicit stacks)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:  # type: ignore[override]
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                dup = key in seen
            except TypeError:
                dup = False
            if dup:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            try:
                seen.add(key)
            except TypeError:
                pass
        return super().construct_mapping(node, deep=deep)


def _compose(text: str) -> Any:
    loader = _Loader(text)
    try:
        return loader.get_single_node()
    finally:
        loader.dispose()


Locate = Callable[[Sequence[Any]], str]


class Bad(Exception):
    """A problem at a path inside a document; turned into a ProfileError with file and line."""

    def __init__(self, path: Sequence[Any], message: str) -> None:
        super().__init__(message)
        self.path = tuple(path)
        self.message = message


def line_locator(text: str, filename: str) -> Locate:
    """A function giving ``FILE:LINE`` of the key at a path (composed on first use: errors only)."""
    def locate(path: Sequence[Any]) -> str:
        try:
            node = _compose(text)
        except (yaml.YAMLError, RecursionError):
            return filename
        mark = node.start_mark if node is not None else None
        for step in path:
            nxt = None
            if isinstance(node, yaml.MappingNode):
                for k, v in node.value:
                    if isinstance(k, yaml.ScalarNode) and k.value == str(step):
                        nxt, mark = v, k.start_mark
                        break
            elif isinstance(node, yaml.SequenceNode) and isinstance(step, int) and step < len(node.value):
                nxt = node.value[step]
                mark = nxt.start_mark
            if nxt is None:
                break
            node = nxt
        return f"{filename}:{mark.line + 1}" if mark is not None else filename
    return locate


def load_yaml(text: str, filename: str) -> Any:
    """Parse YAML; errors name the file, line and column.  Bounded in size and nesting."""
    if len(text) > MAX_TEXT_BYTES:
        raise ProfileError(f"{filename}: larger than {MAX_TEXT_BYTES // (1024 * 1024)} MiB; a profile file is "
                           "a few kilobytes", file=filename)
    loader = _Loader(text)
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{filename}:{mark.line + 1}:{mark.column + 1}" if mark else filename
        problem = exc.problem or exc.context or "syntax error"
        raise ProfileError(f"{where}: not valid YAML: {problem}", file=filename) from None
    except yaml.YAMLError as exc:
        raise ProfileError(f"{filename}: not valid YAML: {exc}", file=filename) from None
    except RecursionError:
        # not reachable through compose_node's bound; a second line of defence for the constructor
        raise ProfileError(f"{filename}: not valid YAML: nested too deeply", file=filename) from None
    finally:
        loader.dispose()


def unknown_fields(path: Sequence[Any], label: str, found: Iterable[Any], known: Sequence[str],
                   where: str = "") -> Bad:
    """Unknown fields, pointing at the first of them (as listed)."""
    names = sorted(map(str, found))
    return Bad(list(path) + [names[0]], f"{label}unknown field(s) {', '.join(names)}{where} "
               f"(known: {', '.join(known)})")


def check_count(path: Sequence[Any], what: str, items: Any, limit: int) -> None:
    """Refuse more than ``limit`` items (configs, entries, names): anchors and aliases can multiply them."""
    try:
        n = len(items)
    except TypeError:
        return
    if n > limit:
        raise Bad(path, f"{what}: {n} items, more than the {limit} gpuvirt accepts")


def run(fn: Callable[[], Any], source: str, locate: Locate | None) -> Any:
    try:
        return fn()
    except Bad as bad:
        where = locate(bad.path) if locate else source
        raise ProfileError(f"{where}: {bad.message}", file=source) from None


__all__ = ["Bad", "Locate", "MAX_CONFIGS", "MAX_DEPTH", "MAX_ENTRIES", "MAX_NAMES", "MAX_TEXT_BYTES",
           "check_count", "line_locator", "load_yaml", "run", "unknown_fields"]
