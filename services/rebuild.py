"""Rebuilding the live views without downtime (SPEC 8): fold the log into fresh tables beside
them while the old ones keep serving, then switch in one transaction.

Used by ``mediamarket projections rebuild`` and at start when the views' schema changed (the
process serves 503 ``engine_starting`` meanwhile; other processes keep serving the old tables).
"""

from __future__ import annotations

import structlog

from adapters.eventstore import MarketApp
from projections.runner import ProjectionRunner
from projections.views import Views, open_scratch_views, scratch_env
from services.replay import LogSource, OnProgress, rebuild

log = structlog.get_logger("rebuild")


def rebuild_live(
    app: MarketApp,
    live: Views,
    live_env: dict[str, str],
    *,
    source: LogSource | None = None,
    only_if_outdated: bool = False,
    on_progress: OnProgress | None = None,
) -> int | None:
    """Rebuild ``live`` (opened from ``live_env``) from the log; returns the log position the
    new tables took over at, or None when another process switched first (``only_if_outdated``:
    a start on a new schema, where the first process to finish wins).

    The fold runs without any lock; only the last events (those saved during it) are folded
    under the switch's lock, so runners in other processes wait for moments, not minutes.
    """
    with scratch_env(live_env) as fresh_env:
        fresh = open_scratch_views(fresh_env, app.name, goes_live=True)
        try:
            end = app.recorder.max_notification_id() or 0
            folded = rebuild(app, fresh, end, source, on_progress=on_progress)
            log.info("rebuild_folded", events=folded, position=end)
            tail = ProjectionRunner(app, fresh)
            tail.catch_up()

            def at_least(position: int) -> int:
                # The new tables take over at their own position, which must not be behind the
                # live one (that would lose events); ahead of it is fine (a live runner that
                # lags): the runners go on from the new position.
                tail.catch_up(until=position)
                return fresh.position(app.name)

            if not live.replace_with(fresh_env, app.name, at_least, only_if_outdated):
                log.info("rebuild_superseded")
                return None
            position = live.position(app.name)
            log.info("rebuild_switched", position=position)
            return position
        finally:
            fresh.datastore.close()
