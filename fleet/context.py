"""What every fleet operation works on: the settings, the database, the package store, the TUF repository.

The API, the CLI's ``init``, the scheduler and the tests build one ``FleetContext`` and pass it
to the operations (``packages.push_package(ctx, ...)``, ``rollouts.create_rollout(ctx, ...)``).
``clock`` is the time source of every timestamp written (seconds since the epoch, UTC), so a
test can move time without sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

from edgeship.fleet.db import Database
from edgeship.fleet.settings import FleetSettings
from edgeship.fleet.storage import LocalStorage, PackageStorage
from edgeship.fleet.tuf_repo import TufRepository
from edgeship.runtime.package import TrustedKeys


@dataclass
class FleetContext:
    """The fleet's settings with the database, the package store and the TUF repository they name."""

    settings: FleetSettings
    db: Database
    storage: PackageStorage
    clock: Callable[[], float] = field(default=time.time)

    @classmethod
    def open(cls, settings: FleetSettings, *, clock: Callable[[], float] = time.time) -> FleetContext:
        """Connect to ``settings.database_url`` and open the store under ``settings.data_dir``.

        Does not migrate the database or create the TUF repository (``edgeship fleet init`` does).
        """
        return cls(settings, Database(settings.database_url), LocalStorage(settings.packages_dir), clock)

    @cached_property
    def tuf(self) -> TufRepository:
        """The fleet's TUF repository; raises ``UsageError`` when ``edgeship fleet init`` has not created it."""
        return TufRepository.open(
            self.settings.tuf_dir, keys_dir=self.settings.tuf_keys_dir, expiry=self.settings.tuf.expiry()
        )

    @cached_property
    def trusted_keys(self) -> TrustedKeys:
        """The publisher keys every pushed package must be signed by (``settings.signing_keys``)."""
        return TrustedKeys.load(self.settings.signing_keys)

    def now(self) -> float:
        return float(self.clock())

    def close(self) -> None:
        self.db.dispose()


__all__ = ["FleetContext"]
