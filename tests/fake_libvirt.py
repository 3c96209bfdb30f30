"""A recording stand-in for ``virsh`` (the rebalance executor's runner): it keeps domains per connection URI
as libvirt would for the calls the executor makes, and records every argument list it was given."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from gpuvirt.errors import HostError

DOMAIN = """<domain type='kvm'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='KiB'>4194304</memory>
  <vcpu>2</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
  </devices>
</domain>
"""


class FakeVirsh:
    def __init__(self) -> None:
        self.domains: dict[str, dict[str, dict]] = {}      # uri -> name -> {"xml", "state"}
        self.calls: list[list[str]] = []
        self.xml_files: list[str] = []                     # the --xml / define files, as read when called
        self.fail_on: str | None = None                    # a verb that fails (exit 1) once

    def add(self, uri: str, name: str, xml: str, state: str = "running") -> None:
        self.domains.setdefault(uri, {})[name] = {"xml": xml, "state": state}

    def where(self, name: str) -> list[tuple[str, dict]]:
        return [(u, d[name]) for u, d in self.domains.items() if name in d]

    def __call__(self, argv: Sequence[str]) -> str:
        argv = list(argv)
        self.calls.append(argv)
        assert argv[0] == "-c"
        uri, verb, rest = argv[1], argv[2], argv[3:]
        doms = self.domains.setdefault(uri, {})
        if self.fail_on == verb:
            self.fail_on = None
            raise HostError(f"virsh {verb}: injected failure")
        name = rest[-1] if verb not in ("migrate", "define") else None
        if verb == "dumpxml":
            if name not in doms:
                raise HostError(f"virsh dumpxml: error: failed to get domain '{name}'")
            return doms[name]["xml"]
        if verb == "domstate":
            if name not in doms:
                raise HostError(f"virsh domstate: error: failed to get domain '{name}'")
            return doms[name]["state"] + "\n"
        if verb == "shutdown":
            doms[name]["state"] = "shut off"
            return ""
        if verb == "start":
            assert doms[name]["state"] == "shut off", argv
            doms[name]["state"] = "running"
            return ""
        if verb == "define":
            text = Path(rest[0]).read_text()
            self.xml_files.append(text)
            from gpuvirt.vmm.libvirt import parse_domain

            n = parse_domain(text).name
            old = doms.get(n, {"state": "shut off"})
            assert old["state"] == "shut off", "a running domain is redefined only after its shutdown here"
            doms[n] = {"xml": text, "state": old["state"]}
            return ""
        if verb == "migrate":
            xml_path = rest[rest.index("--xml") + 1]
            dom, dest = rest[-2], rest[-1]
            text = Path(xml_path).read_text()
            self.xml_files.append(text)
            cur = doms.pop(dom)
            if "--live" in rest:
                assert cur["state"] == "running"
            self.domains.setdefault(dest, {})[dom] = {"xml": text, "state": cur["state"]}
            return ""
        raise AssertionError(f"unexpected virsh call {argv}")
