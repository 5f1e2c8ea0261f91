"""
Resume: pick the newest snapshot that verifies, restore the state from it, and,
under torchrun, every rank from its part of the one snapshot rank 0 picked.

A part of ``Runtime`` (it mixes ``Resuming`` in): the attributes below are the
runtime's.
"""

from __future__ import annotations

import functools
import logging
from typing import Generic, TypeVar

from resumable._archive import Archive, Listed, Loaded
from resumable._distributed import Group
from resumable._iterate import Position, Replay
from resumable._lease import Lease
from resumable._parts import read_part
from resumable._preemption import Preemption
from resumable._saving import Saver, describe_inside
from resumable._settings import Settings
from resumable._snapshot import Manifest, parse_snapshot_name
from resumable._space import check_room
from resumable._state import (
    Metrics,
    decode_resume,
    decode_snapshot,
    place_snapshot,
    schema,
)
from resumable.errors import (
    IncompatibleSnapshotError,
    SnapshotCorruptError,
    SnapshotError,
)

logger = logging.getLogger(__name__)

StateT = TypeVar("StateT")
# Where a run goes on: steps done, the metric history, and the replay of a step
# that a snapshot interrupted (None at a step's end).
Resumed = tuple[int, list[Metrics | None], Replay | None]


class Resuming(Generic[StateT]):
    """The runtime's resume."""

    group: Group | None
    settings: Settings
    lease: Lease
    archive: Archive
    preemption: Preemption
    saver: Saver
    start_marker: tuple[str, str] | None
    lineage: str
    generation: int
    lineage_start: int
    loaded_name: str | None

    def _resume_ranks(self, state: StateT) -> Resumed:
        """Resume every rank from the snapshot that rank 0 picks (``_resume``)."""
        group = self.group
        if group is None:
            return self._resume(state)
        resumed = []

        def lead() -> str | None:
            resumed.append(self._resume(state))
            return self.loaded_name

        name = group.lead(lead, "the resume")
        failure = None
        if not group.leads:
            try:
                resumed.append(self._resume_part(state, name))
            except SnapshotError as err:
                failure = err
        failures = group.gather(failure and str(failure), "the resume")
        if failure is not None:
            raise failure
        failed = [rank for rank, text in enumerate(failures) if text]
        if failed:
            msg = f"Ranks {failed} could not read their part of {name}: {failures}"
            raise SnapshotCorruptError(msg)

        return resumed[0]

    def _resume_part(self, state: StateT, name: str | None) -> Resumed:
        """Restore this rank's part of the snapshot that rank 0 resumed from."""
        if name is None:
            return 0, [], None
        assert self.group is not None  # only ranks other than 0 come here
        manifest = Manifest.from_bytes(self.archive.storage.read_manifest(name), name)
        place = functools.partial(place_snapshot, state)
        loaded = read_part(self.archive, manifest, self.group.rank, place)
        history = decode_snapshot(state, loaded.tree, loaded.buffers)

        return self._resume_point(state, loaded, history)

    def _resume(self, state: StateT) -> Resumed:
        listing = self.archive.listing()
        self.archive.check_foreign(listing)
        self.generation = max((entry.order[0] for entry in listing), default=0)
        self.lineage_start = self.generation + 1
        for name in self.archive.storage.unrecognised():
            logger.warning("unrecognised entry left alone: name=%s", name)
        if self.settings.fresh and listing:
            logger.warning(
                "fresh start: ignoring %d snapshots, retention deletes them",
                len(listing),
            )
        loaded = None
        if not self.settings.fresh:
            place = functools.partial(place_snapshot, state)
            loaded = self.archive.newest_verified(listing, schema(state), place)
        if loaded is not None:
            self._check_arguments(loaded.manifest)
            self.lineage = loaded.manifest.lineage
            self.lineage_start = loaded.manifest.lineage_start
        elif not self.settings.fresh:
            self.lineage = self.archive.first_lineage()
        self._report_attempts()
        if loaded is None:
            self.lease.claim()
            loaded = self._committed_meanwhile(state, None)
        if loaded is None:
            return 0, [], None
        return self._restore(state, loaded)

    def _restore(self, state: StateT, loaded: Loaded) -> Resumed:
        manifest = loaded.manifest
        history = decode_snapshot(state, loaded.tree, loaded.buffers)
        if not self.lease.number:
            # After every check, so that a refused start leaves nothing behind;
            # before anything is deleted or committed.
            self.lease.claim()
            newer = self._committed_meanwhile(state, loaded)
            if newer is not None:
                loaded = newer
                manifest = loaded.manifest
                history = decode_snapshot(state, loaded.tree, loaded.buffers)
        # A run that ends without another commit still leaves the storage tidy;
        # and a lowered --keep makes room before anything is written.
        self.archive.remove_abandoned(self.lineage, self.generation)
        self.archive.prune(self.settings.keep)
        if manifest.step < self.settings.steps or manifest.inside_step:
            check_room(self.archive.storage, manifest)
            marker = self.archive.record_start(manifest, self.settings.max_attempts)
            self.start_marker = (manifest.name, marker)
        logger.info(
            "resumed: step=%d%s, snapshot=%s, storage=%s",
            manifest.step,
            describe_inside(manifest.inside_step),
            manifest.name,
            self.settings.storage,
        )
        self.loaded_name = manifest.name

        return self._resume_point(state, loaded, history)

    def _resume_point(
        self, state: StateT, loaded: Loaded, history: list[Metrics | None]
    ) -> Resumed:
        manifest = loaded.manifest
        if manifest.write_seconds is not None:
            self.preemption.record_write(manifest.write_seconds)
        self.saver.saved_at = manifest.step
        point = decode_resume(loaded.tree, loaded.buffers)
        if point is None:
            return manifest.step, history, None

        def restore_again() -> None:
            decode_snapshot(state, loaded.tree, loaded.buffers)

        position = Position(point["loop"], point["item"])
        return manifest.step, history, Replay(position, point["rngs"], restore_again)

    def _committed_meanwhile(
        self, state: StateT, loaded: Loaded | None
    ) -> Loaded | None:
        """
        Return a snapshot newer than ``loaded`` that an older incarnation
        committed before this one's claim fenced it, or None.

        Also counts those commits, so that this run's come after them.
        """
        listing = self.archive.listing()
        self.generation = max([self.generation, *(e.order[0] for e in listing)])
        if loaded is not None:
            # Only those newer than the one loaded, and not found damaged yet.
            seen = Listed(loaded.manifest.name, loaded.manifest).order
            listing = [
                entry
                for entry in listing
                if entry.order > seen
                and entry.manifest is not None
                and entry.name not in self.archive.damaged
            ]
        if self.settings.fresh or not listing:
            return None
        try:
            newer = self.archive.newest_verified(listing, schema(state))
        except SnapshotError:
            # The newer ones are damaged or foreign: the one loaded stands.
            return None
        if newer is None:
            return None
        self._check_arguments(newer.manifest)
        self.lineage = newer.manifest.lineage
        self.lineage_start = newer.manifest.lineage_start
        logger.info(
            "newer snapshot committed before the claim: snapshot=%s, step=%d",
            newer.manifest.name,
            newer.manifest.step,
        )
        return newer

    def _check_arguments(self, manifest: Manifest) -> None:
        given, saved = self.settings.arguments, manifest.arguments
        if given is None or saved is None or list(given) == saved:
            return
        msg = (
            f"Snapshot {manifest.name} comes from a run with script arguments "
            f"{saved}, and this one has {list(given)}. Run the same command to "
            "resume, or start over with --fresh (or another --storage)."
        )
        raise IncompatibleSnapshotError(msg)

    def _report_attempts(self) -> None:
        mine, foreign = self.archive.attempts(self.lineage)
        for name in mine:
            logger.info(
                "incomplete snapshot ignored: name=%s, step=%s",
                name,
                parse_snapshot_name(name),
            )
        for name in foreign:
            logger.warning(
                "uncommitted folder not of this run left alone: name=%s", name
            )
