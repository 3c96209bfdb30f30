"""Hostile inputs against intent ownership across machines (owner_state, the lease, the heartbeat).

The owners are forged as in tests/test_crash_owners.py: a process of the other simulated host's machine."""

from __future__ import annotations

import datetime as dt
from types import SimpleNamespace

import pytest

from test_crash_owners import PID, _forge, _marker, _open_on_hb, hosts  # noqa: F401 - hosts is a fixture

pytestmark = pytest.mark.crash

OTHER = "0b5c3e7e-1f0d-4c84-8e41-5b7f2a9d6c10"      # a boot id of another machine


def _row(updated_at, owner=f"{OTHER}:{PID}:987654"):
    return SimpleNamespace(state="running", owner=owner, updated_at=updated_at, host_id="hb")


@pytest.mark.parametrize("ahead", [10 ** 6, 301, None])
def test_a_lease_renewed_from_far_in_the_future_does_not_hold_forever(ahead):
    """An updated_at further ahead of this machine's clock than the lease (a clock set years ahead, a row
    written by hand) made the owner alive until this clock caught up, up to forever (year 9999), while
    'status' said it was heard from "0 s ago".  Clocks must agree to within the lease, so such a renewal is
    no evidence of life, as one as far in the past is not."""
    from gpuvirt.service import intent

    now = dt.datetime(2026, 12, 6, 22, 0, 0)
    seen = dt.datetime.max if ahead is None else now + dt.timedelta(seconds=ahead)
    assert intent.owner_state(_row(seen), OTHER, 300, own_host=False, now=now) is None


def test_a_lease_slightly_ahead_still_holds():
    """Clock skew within the lease is tolerated: the owner is alive."""
    from gpuvirt.service import intent

    now = dt.datetime(2026, 12, 6, 22, 0, 0)
    who = intent.owner_state(_row(now + dt.timedelta(seconds=60)), OTHER, 300, own_host=False, now=now)
    assert who is not None and "\n" not in who


def test_an_intent_renewed_in_the_future_is_settled_once_the_lease_cannot_hold(hosts):  # noqa: F811
    from gpuvirt.service import intent, rebalance_exec

    _root, ca, cb = hosts
    iid, addr = _open_on_hb(cb)
    _forge(cb, iid, _marker(cb), age=-10 * 365 * 86400)       # renewed ten years from now
    with rebalance_exec.reach(ca, {"hb": cb}, None):
        [res] = intent.recover(cb, {addr})
    assert res["intent"] == iid and res["result"] == "back"
    assert not intent.open_intents(cb)
