"""edgeship: compile a model once for every kind of edge device, ship it safely, watch it there.

Subpackages (each a top-level folder of the repository, linked here):

- ``edgeship.targets``: device profiles.
- ``edgeship.runtime``: the model package format and the inference Session (device side).
- ``edgeship.compiler``: loaders, passes, emitters and validation (host side).
- ``edgeship.device_agent``: the on-device agent (device side).
- ``edgeship.fleet``: the fleet manager (server side).
"""

from edgeship._version import __version__

__all__ = ["__version__"]
