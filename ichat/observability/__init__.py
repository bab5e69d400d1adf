"""What operators watch iChat with: Prometheus alert rules (``alerts.yml``), a Grafana
dashboard (``grafana-dashboard.json``), and a Prometheus server for a local fleet
(``ichat up --prometheus``, :mod:`ichat.observability.prometheus`).

The files ship inside the package, so an installed iChat finds them;
``deploy/observability`` links to them next to the scrape configuration and the
Kubernetes objects."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def shipped(name: str) -> Path:
    """The path of a file shipped in this package (``alerts.yml``, ...)."""
    return Path(str(resources.files(__name__).joinpath(name)))
