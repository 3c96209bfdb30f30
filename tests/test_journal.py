"""The create/destroy journal: crash-safe rows around host operations."""

from __future__ import annotations

import pytest

from gpuvirt.context import Context, resolve_settings
from gpuvirt.errors import CapacityError
from gpuvirt.service import hostview
from gpuvirt.service.instances import Journal, instance_fields_for_vgpu


def _ctx(sim):
    return Context(resolve_settings(sim=str(sim.root), env={}))


def test_failed_activation_undoes_the_host_object_and_the_row(make_sim):
    sim = make_sim(["mtty"])
    with _ctx(sim) as ctx:
        view = hostview.snapshot(ctx)
        with ctx.inventory.unit(write=True) as uow:
            gpu_id = hostview.record(ctx, view, uow)["mtty"].id
        uuid = "11111111-2222-3333-4444-555555555555"
        fields = instance_fields_for_vgpu(None, "mdev", "mtty-2", None, "mtty", uuid, "attach")

        def refuse(uow, row):
            raise CapacityError("tenant t would exceed its quota")

        with pytest.raises(CapacityError):
            Journal(ctx).create(gpu_id, fields, lambda: (ctx.host.create_mdev("mtty", "mtty-2", uuid), {})[1],
                                "mdev for the test", on_active=refuse, cleanup=lambda: ctx.host.remove_mdev(uuid))
        assert not ctx.host.mdev_exists(uuid)
        with ctx.inventory.unit() as uow:
            assert uow.instances(ctx.settings.host_id) == []
            assert uow.events(limit=1)[0].result == "failed"


def test_failed_host_operation_leaves_no_row(make_sim):
    sim = make_sim(["mtty"])
    with _ctx(sim) as ctx:
        view = hostview.snapshot(ctx)
        with ctx.inventory.unit(write=True) as uow:
            gpu_id = hostview.record(ctx, view, uow)["mtty"].id
        fields = instance_fields_for_vgpu(None, "mdev", "mtty-2", None, "mtty", "not-used", "attach")
        from gpuvirt.errors import UsageError

        with pytest.raises(UsageError):
            Journal(ctx).create(gpu_id, fields, lambda: (ctx.host.create_mdev("mtty", "mtty-2", "bad"), {})[1],
                                "bad mdev")
        with ctx.inventory.unit() as uow:
            assert uow.instances(ctx.settings.host_id) == []
