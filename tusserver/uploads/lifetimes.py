"""How long an upload lives in each state: a pure function of the settings and the time."""

from __future__ import annotations

from dataclasses import dataclass

from tusserver.settings import Settings

RECEIVED_GRACE_S = 60.0  # a `received` upload not completed by then is hashed by the sweeper


@dataclass(frozen=True)
class Lifetimes:
    """When an upload's time in the expiry index comes, by its status."""

    expire_after_s: float  # an unfinished upload expires this long after its last activity
    retention_s: float | None  # a completed upload is removed this long after; None: kept

    @classmethod
    def of(cls, settings: Settings) -> Lifetimes:
        return cls(expire_after_s=settings.expire_after_s, retention_s=settings.retention_s)

    def expires_at(self, status: str, now: float) -> float | None:
        """`uploading`: it expires; `received`: the sweeper hashes it if its process did not;
        `completed`: it is removed after --retention (never, without one)."""
        if status == "uploading":
            return now + self.expire_after_s
        if status == "received":
            return now + RECEIVED_GRACE_S
        return None if self.retention_s is None else now + self.retention_s
