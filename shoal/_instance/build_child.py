"""The child process that builds a config file's applications (see ``plane.build_in_child``).

``python -m shoal._instance.build_child OUTPUT CONFIG`` (or forked by the fork
server, which runs :func:`main` the same way) reads the config (JSON) from the
file CONFIG, builds each application independently (one failing does not stop the
others) and writes a pickled list of ``BuildResult`` to OUTPUT. What user code
prints goes to this process's stdout and stderr, inherited from the instance.
"""

from __future__ import annotations

import json
import pickle
import sys

from shoal._api.graph import build_app
from shoal._deploy_config import parse_config
from shoal._instance.build import build_application
from shoal._instance.plane import BuildResult


def build_all(data: object) -> list[BuildResult]:
    config = parse_config(data, "config")
    results = []
    for index, app in enumerate(config.applications):
        try:
            built = build_application(config, index)
            spec = build_app(
                built.app, app.name, built.route_prefix, None,
                direct_ingress_port=built.direct_ingress_port,
            )  # fmt: skip
        except Exception as exc:
            results.append(BuildResult(index, app.name, None, f"{type(exc).__name__}: {exc}"
                                       if not _is_config_error(exc) else str(exc)))  # fmt: skip
            continue
        results.append(BuildResult(index, app.name, spec, None))
    return results


def _is_config_error(exc: BaseException) -> bool:
    from shoal._errors import ConfigError

    return isinstance(exc, ConfigError)


def main() -> None:
    output, config = sys.argv[1:3]
    with open(config, "rb") as file:
        results = build_all(json.loads(file.read()))
    with open(output, "wb") as file:
        pickle.dump(results, file)


if __name__ == "__main__":
    main()
