"""Where a moved device may land, best first (pure): the places part of :class:`gpuvirt.model.cluster.ClusterIndex`.

A place is judged as the planner's placement policies judge one (:mod:`gpuvirt.model.planner`): first by how
much worse it leaves the GPU's free space (:meth:`PlaceMeasures.badness`, part of a plan's cost), then, among
places of equal badness, by the rest of the frag-aware key on a MIG GPU or of ``consolidate`` on a board
(:meth:`PlaceMeasures.tie`), so that a moved device goes where a new one of its shape would.
"""

from __future__ import annotations

from gpuvirt.model.mig import Placed
from gpuvirt.model.planner_state import _weights_key

# The weight of the fragmentation F (FGD's measure, uniform weights) next to the stranded slices S in a
# place's badness: small enough that F only decides between plans that strand alike (stranding steps by half
# a slice, and F's term stays within 0 and 2 x 7 x 0.01 per place, so up to 3 moves add less than 0.5), and
# it decides before the data moved (MovePolicy.prefer="fragmentation").
FRAG_TIE = 0.01


class PlaceMeasures:
    """Mixed into ``ClusterIndex``: uses its tables, contents, demands and memo dicts."""

    def _weights(self, t) -> tuple:
        """The frag-aware policy's default request mix (uniform) for the geometry of tables ``t``."""
        got = self._wkey.get(id(t))
        if got is None:
            got = self._wkey[id(t)] = _weights_key(t.geom, None)
        return got

    def badness(self, gi: int, c: int, start: int, d: int) -> float:
        """How much a unit of demand ``d`` landing here hurts later placements: the compute slices it strands
        (the frag-aware policy's S), plus half a slice for opening an empty GPU, plus :data:`FRAG_TIE` times
        the growth of the GPU's fragmentation F; on a board, 1 for opening an empty one.

        Never negative, so that a plan's partial cost bounds its final cost (the search prunes on it): F can
        shrink when a place fills a GPU, by at most its compute slices, so those are added to the growth.  A
        constant per move of a geometry, it changes no choice between plans with as many moves."""
        t = self.g_tables[gi]
        if t is None:
            return 1.0 if not self.cont[c] else 0.0
        pid = self.demands[d][1]
        pids = tuple(sorted(t.by_id))
        wkey = self._weights(t)
        lay = self.layout(c)
        after = tuple(sorted(lay + (Placed(start, t.by_id[pid].memory_slices, pid),)))
        return (float(t.stranded(after, pids) - t.stranded(lay, pids)) + (0.5 if not lay else 0.0)
                + FRAG_TIE * (t.geom.compute_slices + t.frag(after, wkey) - t.frag(lay, wkey)))

    def tie(self, gi: int, c: int, start: int, d: int) -> tuple:
        """What orders places of equal :meth:`badness`, as the placement policies do: on a MIG GPU the rest
        of the frag-aware key (free compute after, growth of F, minus the placements left), on a board the
        rest of ``consolidate`` (a board already hosting the type first, then the least room left, then the
        most framebuffer in use)."""
        t = self.g_tables[gi]
        _, pid, type_id = self.demands[d]
        content = self.cont[c]
        if t is None:
            return (not any(self.u_type[u] == type_id for _, u in content),
                    self._board_available(gi, type_id, content),
                    -sum(self.g_types[gi][self.u_type[u]].framebuffer_mib for _, u in content))
        wkey = self._weights(t)
        lay = self.layout(c)
        prof = t.by_id[pid]
        after = tuple(sorted(lay + (Placed(start, prof.memory_slices, pid),)))
        return (t.compute_free(lay) - prof.compute_slices, round(t.frag(after, wkey) - t.frag(lay, wkey), 9),
                -t.survivors(after))

    def places(self, d: int, gi: int, c: int) -> tuple[tuple[float, tuple, int, int], ...]:
        """(badness, tie, gpu, start) of each legal place for demand ``d`` on GPU ``gi``, best first."""
        key = (d, gi, c)
        got = self._places.get(key)
        if got is None:
            got = tuple(sorted((self.badness(gi, c, s, d), self.tie(gi, c, s, d), gi, s)
                               for s in self.starts(d, gi, c)))
            if len(self._places) > 200_000:
                self._places.clear()
            self._places[key] = got
        return got

    def places_everywhere(self, d: int) -> list[tuple[float, tuple, int, int]]:
        """:meth:`places` over every compatible GPU in the starting state, best first."""
        got = self._everywhere.get(d)
        if got is None:
            got = sorted(p for gi in self.d_compat[d] for p in self.places(d, gi, self.start[gi]))
            self._everywhere[d] = got
        return got
