"""The step kinds of the intent journal that edit files rather than the GPUs: a ``<hostdev>`` in a domain XML
file (``attach`` / ``detach --domain-xml``) and a CDI spec file gpuvirt owns (docs/containers.md).  Like every
step kind (:mod:`gpuvirt.service.intent_steps`) each is an *ensure* in both directions."""

from __future__ import annotations

import os
from typing import Any

from gpuvirt.errors import ConflictError
from gpuvirt.service.intent_steps import OPS, _Op


class DomainXmlOp(_Op):
    def describe(self, forward: bool = True) -> str:
        add = self.step["present"] == forward
        return f"{'add' if add else 'remove'} the <hostdev> in {self.p['path']}"

    def _has(self, text: str) -> bool:
        from gpuvirt.vmm.libvirt import normalize_pci_address, normalize_uuid, parse_domain

        want = ("mdev", normalize_uuid(self.p["uuid"])) if self.p.get("uuid") else \
            ("pci", normalize_pci_address(self.p["address"]))
        return any(h.key == want for h in parse_domain(text).hostdevs)

    def ensure(self, present: bool) -> dict[str, Any]:
        from gpuvirt.vmm.libvirt import insert_hostdev, remove_hostdev, rewrite_file_in_place

        def edit(text: str) -> str:
            has = self._has(text)
            if present and not has:
                return insert_hostdev(text, self.p["xml"])
            if not present and has:
                return remove_hostdev(text, uuid=self.p.get("uuid"), address=self.p.get("address"))
            return text

        if not present and not os.path.exists(self.p["path"]):
            return {}               # the file is gone: so is the element
        rewrite_file_in_place(self.p["path"], edit)
        return {}

    def holds(self, view: Any, present: bool) -> bool:
        try:
            with open(self.p["path"], encoding="utf-8") as fh:
                return self._has(fh.read()) == present
        except OSError:
            return not present

    def record(self, uow: Any, present: bool, facts: dict[str, Any]) -> None:
        """Nothing: the domain XML file is the operator's, not a row of the inventory."""


class CdiOp(_Op):
    """A spec file under the CDI spec folder.  Forward (present): the file holds exactly the rendered text,
    written atomically; absent: gpuvirt's file is gone.  A file at that path that gpuvirt did not write is
    never touched: making it present is refused, and for "absent" it does not count as gpuvirt's spec."""

    def describe(self, forward: bool = True) -> str:
        add = self.step["present"] == forward
        return f"{'publish' if add else 'remove'} CDI spec {self.p['name']} ({self.p['path']})"

    def _read(self) -> str | None:
        from gpuvirt.host.devnodes import read_spec
        from gpuvirt.vmm.cdi import MAX_SPEC_BYTES

        return read_spec(self.p["path"], MAX_SPEC_BYTES)

    def ensure(self, present: bool) -> dict[str, Any]:
        from gpuvirt.host.devnodes import remove_spec, write_spec
        from gpuvirt.vmm.cdi import owned

        text = self._read()
        if text is not None and owned(text) is None:
            if present:
                raise ConflictError(f"{self.p['path']} exists and was not written by gpuvirt; it is left as it "
                                    "is (move it away, or configure another [cdi] vendor)")
            return {}
        if present and text != self.p["text"]:
            write_spec(self.p["path"], self.p["text"])
        elif not present and text is not None:
            remove_spec(self.p["path"])
        return {}

    def holds(self, view: Any, present: bool) -> bool:
        from gpuvirt.vmm.cdi import owned

        text = self._read()
        if present:
            return text == self.p["text"]
        return text is None or owned(text) is None


OPS["domain-xml"] = DomainXmlOp
OPS["cdi"] = CdiOp

__all__ = ["DomainXmlOp", "CdiOp"]
