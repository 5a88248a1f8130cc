"""The dashboard: a web page at ``/`` of the admin address, and the history it plots.

Sits between the controller and the instance: the instance's admin REST API
(``shoal._instance.rest``) mounts :class:`~shoal._dashboard.server.Dashboard`'s
routes. The page itself is plain HTML, JavaScript and CSS shipped in
``static/`` (no build step, nothing fetched from elsewhere); it reads the same
JSON as the CLI (``GET /api/serve/applications/``) plus the time series that
:class:`~shoal._dashboard.history.MetricsHistory` keeps.
"""
