"""The fleet's web dashboard: server-rendered pages (Jinja2) for people, beside the API for programs.

Pages (docs/dashboard.md): the fleet overview (online/offline, versions and slots, open alerts, a
paged device list), a device's telemetry charts and events, rollouts with per-wave progress, gate
values against their thresholds and the reason for a halt, and pause/resume/abort/approve for
admins. Log in by pasting an API token; the session is a signed HttpOnly, SameSite=Strict cookie
(``sessions``), every POST carries a CSRF token.

Nothing is loaded from the internet and nothing is built: the templates, one stylesheet and two
small scripts (``static/edgechart.js`` draws SVG line charts from JSON embedded in the page) ship
inside the package. ``fleet.api.create_app`` mounts it (``pages.mount``).
"""

from edgeship.fleet.dashboard.pages import PREFIX, Dashboard, mount

__all__ = ["PREFIX", "Dashboard", "mount"]
