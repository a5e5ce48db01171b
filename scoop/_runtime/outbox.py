"""What leaves this worker: the outbox shipped as task groups, results, finished groups,
credit requests, and the tasks it hands back.

::

    submit() -> outbox {id: Future}
    ship(): every future -> pending (owned here, until its result comes)
            no broker: the run queue (all of it)
            keep_first: the first group stays in the run queue (no pickle, no round trip),
                        then groups of big arguments up to this worker's share (no copy)
            the rest: guided groups (policy.guided_groups), one pickle each -> TASKS
                      (a task with a time limit: never kept, alone, tag LIMITED)
                      (the first message carries one group, the next SHIP_BATCH each)
    flush(): ship; then the results of tasks run for others, one parcel per owner, the
             groups finished, and the credit request (policy.want) -> RESULTS or READY
    give_back(): unstarted tasks of the run queue -> RETURN (policy.give_back,
                 return_tag), while this worker may not run them (all of them when it
                 leaves)
    send_pieces(): the pieces of a lost map chunk -> RETURN, first in line

A group's call list is pickled once, when it leaves; its futures then drop their
arguments (the function stays, for repr and error messages), except map chunks, whose
owner keeps their items to resume them after a worker loss (``scoop._chunks``). A call
that cannot be pickled fails its own future only.
"""

from __future__ import annotations

import itertools
from operator import attrgetter
from typing import TYPE_CHECKING

from .. import _chunks, _serialize, _shm
from .. import _protocol as P
from .._errors import SerializationError
from .._limits import limit_of
from . import policy
from .hub import Group

if TYPE_CHECKING:
    from .._future import Future
    from .worker import Worker

# A future's call and id, read over a group with map(): no comprehension (a Python call
# in 3.11) per group shipped.
_CALL, _ID, _WEIGHT = attrgetter("_call"), attrgetter("_id"), attrgetter("_weight")
_KEPT = object()  # _pack_group: the group stays here


class Shipper:
    """The outbox and everything this worker sends that carries work or results."""

    def __init__(self, rt: Worker) -> None:
        self.rt = rt
        self.outbox: dict[int, Future] = {}  # submitted, not shipped yet, by id
        self.pending: dict[int, Future] = {}  # shipped futures owned here, by id
        self.away: set[int] = set()  # ids of those sent to the broker, until they finish
        self.results_out: dict[int, list] = {}  # owner -> (tid, ok, value, fn, args)
        self.done_out: list[tuple[int, int]] = []  # finished groups: (owner, fid)
        # Shipped futures whose group's arguments are in shared memory (scoop._shm), by id
        self.leases: dict[int, _shm.Lease] = {}
        self.pool: _shm.Pool | None = None  # those segments, reused
        self._fids = itertools.count(1)
        self._returned = itertools.count(1)  # ids of groups handed back (returned_tag)

    def ship(self, keep_first: bool = False) -> None:
        """Send every future of the outbox away (to the broker, or to the local queue).

        With ``keep_first`` (this worker is about to wait, or a map starts), the first
        group stays here if nothing else is queued: it runs on this worker without being
        pickled or making a broker round trip, while the rest leaves at once.
        """
        outbox = self.outbox
        if not outbox:
            return
        futs = list(outbox.values())
        outbox.clear()
        pending = self.pending
        for f in futs:
            f._mark_running()
            pending[f._id] = f
        rt = self.rt
        link = rt.link
        if link is None:
            self._keep(futs)
            return
        keep = keep_first and rt.policy.keeps_first(len(rt.runq))
        # After the first, groups of big arguments stay too while they fit in this
        # worker's share: each would be copied (into shared memory, or onto the wire)
        # for this worker to run it, as likely as not (issue 12, bench line 6). Not map
        # chunks: their consumer resumes after the first, and would hand them back.
        share, kept = (sum(map(_WEIGHT, futs)) // rt.size if keep and rt.size > 1 else 0), 0
        batch: list[P.Parcel] = []
        sent_first = False
        # one future (a submit, then a wait): one group, without the cutting
        for group in (futs,) if len(futs) == 1 else self._groups(futs):
            if keep and limit_of(group[0]._call) is None:  # a limited task never stays
                self._keep(group)
                keep, kept = False, sum(map(_WEIGHT, group))
                continue
            weight = sum(map(_WEIGHT, group)) if kept else 0
            parcel = self._pack_group(group, keep_big=bool(kept) and kept + weight <= share)
            if parcel is _KEPT:
                self._keep(group)
                kept += weight
                continue
            if parcel is not None:
                batch.append(parcel)
            if len(batch) >= (policy.SHIP_BATCH if sent_first else 1):
                link.send(P.TASKS, parcels=batch)
                batch, sent_first = [], True
        if batch:
            link.send(P.TASKS, parcels=batch)

    def _keep(self, futs: list[Future]) -> None:
        group = Group(self.rt.wid, 0, len(futs))  # fid 0: never held by the broker
        self.rt.runq.extend((group, f._id, f._call) for f in futs)

    def _groups(self, futs: list[Future]):
        weights = [f._weight for f in futs]
        plain = [f._chunk is None for f in futs]
        alone = [limit_of(f._call) is not None for f in futs]
        for start, stop in policy.guided_groups(weights, plain, self.rt.size, alone):
            yield futs[start:stop]

    def _pack_group(self, futs: list[Future], keep_big: bool = False):
        """The parcel of a group (None: no call of it could be pickled); with
        ``keep_big``, _KEPT instead if its frames are big (see ship)."""
        try:
            frames = _serialize.dumps(list(map(_CALL, futs)))
        except Exception:  # noqa: BLE001 - find and fail the culprits, ship the rest
            good = []
            for f in futs:
                try:
                    _serialize.dumps(f._call)
                    good.append(f)
                except Exception:  # noqa: BLE001
                    msg = _serialize.describe_unpicklable(*f._call)
                    self.rt.complete(f, False, SerializationError(msg))
            if not good:
                return None
            futs = good
            frames = _serialize.dumps(list(map(_CALL, futs)))
        else:
            if (keep_big and futs[0]._chunk is None and limit_of(futs[0]._call) is None
                    and not _shm.small(frames)):
                return _KEPT  # (its pickle, zero-copy views of the arguments, is dropped)
        ids = list(map(_ID, futs))
        tids = P.task_ids_frame(ids)
        self.away.update(ids)
        if self.rt.shm is not None and not _shm.small(frames):  # through shared memory
            frames, lease = self._pool().place(frames, len(futs))
            if lease is not None:  # freed when the group is done here (Worker.complete)
                for f in futs:
                    self.leases[f._id] = lease
        codec = self.rt.link.codec
        limit = P.LIMITED if limit_of(futs[0]._call) is not None else 0  # alone if so
        if futs[0]._chunk is not None:  # map chunks: kept, to be resumed if they are lost
            tag = next(self._fids) | P.RESUMABLE | limit
            if any(f._chunk.charged(len(f._call[1][1])) for f in futs):
                tag |= P.SUSPECT  # items that may have killed a worker: never for the root
            return codec.parcel([tids, *frames], tag=tag)
        for f in futs:
            f._drop_arguments()
        return codec.parcel([tids, *frames], tag=next(self._fids) | limit)

    def _pool(self) -> _shm.Pool:
        if self.pool is None or self.pool.job != self.rt.shm:
            self.pool = _shm.Pool(self.rt.shm)
        return self.pool

    def release(self, fid: int) -> None:
        """Future ``fid`` is done: one task less holds its group's argument segments."""
        lease = self.leases.pop(fid, None)
        if lease is not None:
            lease.release()

    def close_pool(self) -> None:
        if self.pool is not None:
            self.pool.close()

    def flush(self) -> None:
        """Ship the outbox, send results and finished groups, ask for work if low."""
        if self.outbox:
            self.ship()
        rt = self.rt
        link = rt.link
        if link is None:
            self.done_out.clear()
            return
        want = rt.policy.want(len(rt.runq), bool(rt.wakeups))
        if self.results_out or self.done_out:
            parcels = []
            for owner, items in self.results_out.items():  # (no comprehension: a call)
                parcels.append(self._pack_results(owner, items))
            # the credit request rides along: one message instead of two
            link.send(P.RESULTS, arg=want, parcels=parcels, done=self.done_out)
            self.results_out = {}
            self.done_out = []
        elif want:
            link.send(P.READY, arg=want)

    def _pack_results(self, owner: int, items: list) -> P.Parcel:
        if len(items) == 1:  # one result (a remote round trip): no comprehension
            wire = [items[0][:3]]
        else:
            wire = [(tid, ok, value) for tid, ok, value, _, _ in items]
        try:
            frames = _serialize.dumps(wire)
        except Exception:  # noqa: BLE001 - replace the unpicklable results only
            fixed = []
            for tid, ok, value, fn, args in items:
                try:
                    _serialize.dumps(value)
                except Exception:  # noqa: BLE001
                    err = _serialize.unpicklable_result_error(fn, args, value)
                    ok, value = False, _serialize.wire_exception(err, self.rt.where)
                fixed.append((tid, ok, value))
            frames = _serialize.dumps(fixed)
        if self.rt.shm is not None and not _shm.small(frames):
            frames = _shm.place_results(frames, self.rt.shm)  # the owner unlinks them
        return self.rt.link.codec.parcel(frames, peer=owner)

    def send_partial(self, owner: int, tid: int, values: list, func=None) -> None:
        """Send the finished results of a map chunk still running to its owner."""
        entry = (tid, _chunks.PARTIAL, values, _chunks.partial_results, (func,))
        self.rt.link.send(P.RESULTS, parcels=[self._pack_results(owner, [entry])])

    def give_back(self) -> None:
        """Return the unstarted tasks to the broker, to be run by another worker."""
        rt = self.rt
        runq, link = rt.runq, rt.link
        if not runq or link is None:
            return
        stay, groups = policy.give_back(runq, everything=rt.policy.leaving)
        runq.clear()
        runq.extend(stay)
        parcels = []
        for group, items in groups:
            first = self.pending.get(items[0][0])
            tag = policy.return_tag(group.fid, group.remaining, len(items),
                                    first is not None and first._chunk is not None,
                                    P.returned_tag(rt.wid, next(self._returned)))
            if tag == group.fid and group.parcel is not None:
                parcels.append(group.parcel)  # the whole group, none of it run: as it came
                group.remaining -= len(items)
                continue
            try:
                frames = _serialize.dumps([call for _, call in items])
            except Exception:  # noqa: BLE001 - keep what cannot travel; run it later
                runq.extend((group, tid, call) for tid, call in items)
                continue
            group.remaining -= len(items)
            tids = P.task_ids_frame(tid for tid, _ in items)
            parcels.append(link.codec.parcel([tids, *frames], tag=tag, peer=group.owner))
        if parcels:
            link.send(P.RETURN, parcels=parcels)

    def send_pieces(self, subs: list[Future]) -> None:
        """Send the pieces of lost map chunks back to the broker, first in line."""
        pending = self.pending
        for sub in subs:
            sub._mark_running()
            pending[sub._id] = sub
        parcels = [p for group in self._groups(subs)
                   if (p := self._pack_group(group)) is not None]
        for parcel in parcels:
            parcel.peer = self.rt.wid
        self.rt.link.send(P.RETURN, parcels=parcels)
