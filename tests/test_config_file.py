"""Ray Serve's config file: validated by one strict schema, built into applications.

A config file Ray Serve accepts deploys on shoal unchanged; every problem is one
line naming the field path and the bad value.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from shoal import serve
from shoal._api.deployment import Application
from shoal._deploy_config import load_config_file, parse_config
from shoal._errors import ConfigError
from shoal._instance.build import (
    BuiltApp,
    build_applications,
    config_for,
    deployment_names,
    load_target,
)

TESTS = Path(__file__).parent
RAY_CONFIG = TESTS / "configs" / "ray_serve_config.yaml"
ROOT = TESTS.parent

MINIMAL = {"applications": [{"import_path": "config_fixture_apps:app"}]}


def _configs(app: Application) -> dict[str, dict[str, Any]]:
    """Each deployment's explicitly set options, by its name in the application."""
    return {
        name: node.deployment.config.model_dump(exclude_unset=True, exclude={"name"})
        for node, name in deployment_names(app)
    }


def _error(data: Any) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "serve.yaml")
    return str(info.value)


def _with(change: dict[str, Any], app: dict[str, Any] | None = None) -> dict[str, Any]:
    data = copy.deepcopy(MINIMAL)
    data["applications"][0].update(app or {})
    data.update(change)
    return data


# --- a real Ray Serve config file -------------------------------------------------------------


def test_a_ray_serve_config_file_parses_and_builds_with_its_overrides() -> None:
    config = load_config_file(str(RAY_CONFIG))
    assert config.proxy_location == "EveryNode"
    assert (config.http_options.host, config.http_options.port) == ("0.0.0.0", 8000)
    built = build_applications(config)
    assert [(b.name, b.route_prefix, b.index) for b in built] == [
        ("text_ml", "/", 0),
        ("greet", "/greet", 1),
    ]
    assert all(isinstance(b, BuiltApp) and isinstance(b.app, Application) for b in built)
    assert _configs(built[0].app) == {
        # the code's max_ongoing_requests stays; the file adds the rest
        "Summarizer": {"num_replicas": 1, "max_ongoing_requests": 7, "health_check_period_s": 5.0},
        # the file's ray_actor_options replace the code's {num_cpus: 1, num_gpus: 0.5} whole
        "Translator": {
            "num_replicas": 2,
            "user_config": {"language": "french"},
            "ray_actor_options": {"num_cpus": 0.2, "num_gpus": 0.0},
        },
    }
    greeter = built[1].app
    assert greeter.deployment.name == "Greeter" and greeter.args == ("Bonjour", 2)


def test_the_built_applications_serve_in_local_testing_mode() -> None:
    built = build_applications(load_config_file(str(RAY_CONFIG)))
    names = []
    try:
        for app in built:
            names.append(f"cfg-local-{app.name}")
            serve.run(app.app, name=names[-1], route_prefix=None, _local_testing_mode=True)
        text_ml = serve.get_app_handle(names[0])
        assert text_ml.remote("Hello world. And more.").result() == "[french] Hello world"
        assert serve.get_app_handle(names[1]).remote("Ann").result() == "Bonjour Bonjour, Ann!"
    finally:
        for name in names:
            serve.delete(name)


def test_the_model_dump_round_trips() -> None:
    config = load_config_file(str(RAY_CONFIG))
    dumped = config.model_dump(mode="json", exclude_unset=True)
    assert parse_config(json.loads(json.dumps(dumped)), "dump") == config
    assert dumped["applications"][1] == {
        "name": "greet", "route_prefix": "/greet",
        "import_path": "config_fixture_apps.build_greeter",
        "args": {"greeting": "Bonjour", "times": 2},
    }  # fmt: skip


def test_json_files_are_read_by_content(tmp_path: Path) -> None:
    path = tmp_path / "serve_config"  # no extension: the content decides
    path.write_text(json.dumps(MINIMAL))
    assert load_config_file(str(path)).applications[0].name == "default"
    assert load_config_file(str(path)).applications[0].route_prefix == "/"


# --- validation errors: one line per problem, with path and value ------------------------------

ERRORS = [
    (
        _with({}, {"deployments": [{"name": "A", "num_replicas": -1}]}),
        "applications[0].deployments[0].num_replicas: -1 is not >= 0",
    ),
    (
        _with({}, {"deployments": [{"name": "A", "num_replicas": "two"}]}),
        "applications[0].deployments[0].num_replicas: 'two' is not an integer or 'auto'",
    ),
    (
        _with({}, {"deployments": [{"name": "A", "max_ongoing_requests": 0}]}),
        "applications[0].deployments[0].max_ongoing_requests: 0 is not >= 1",
    ),
    (
        _with({"http_options": {"port": "8000"}}),
        "http_options.port: '8000' is not an integer",  # strict: no silent coercion
    ),
    (
        _with({"proxy_location": "Everywhere"}),
        "proxy_location: 'Everywhere' is not 'EveryNode', 'HeadOnly' or 'Disabled'",
    ),
    (
        _with({}, {"imprt_path": "x:y"}),
        "applications[0].imprt_path: unknown key (did you mean 'import_path'?); valid keys: "
        "args, autoscaling_policy, deployments, direct_ingress_port, external_scaler_enabled, "
        "import_path, logging_config, name, route_prefix, runtime_env",
    ),
    (
        _with({}, {"deployments": [{"name": "A", "ray_actor_options": {"num_gpu": 1}}]}),
        "applications[0].deployments[0].ray_actor_options.num_gpu: unknown key (did you mean "
        "'num_gpus' or 'num_cpus'?); valid keys: accelerator_type, memory, num_cpus, num_gpus, "
        "object_store_memory, resources, runtime_env",
    ),
    (
        {"applications": [{"name": "a"}]},
        "applications[0].import_path: required, but missing",
    ),
    ({"http_options": {}}, "applications: required, but missing"),  # as in Ray: [] runs none
    (
        _with({}, {"import_path": "no_separator"}),
        "applications[0].import_path: 'no_separator' is not an import path: expected "
        "'module.submodule:attribute' or 'module.submodule.attribute'",
    ),
    (
        _with({}, {"route_prefix": "api/"}),
        "applications[0].route_prefix: 'api/' must start with '/'",
    ),
    (  # Ray's rule: '#' separates the parts of a replica id
        _with({}, {"name": "a#b"}),
        "applications[0].name: 'a#b' must not contain '#'",
    ),
    (
        _with({}, {"deployments": [{"name": "A#1"}]}),
        "applications[0].deployments[0].name: 'A#1' must not contain '#'",
    ),
    (
        {
            "applications": [
                {"name": "a", "import_path": "m:x", "route_prefix": "/a"},
                {"name": "b", "import_path": "m:x", "route_prefix": "/b"},
                {"name": "a", "import_path": "m:y", "route_prefix": "/c"},
            ]
        },
        "applications[2].name: 'a' is also the name of applications[0]: each name must be unique",
    ),
    (
        {
            "applications": [
                {"name": "a", "import_path": "m:x"},
                {"name": "b", "import_path": "m:y"},
            ]
        },
        "applications[1].route_prefix: '/' is also the route_prefix of applications[0]: "
        "each route_prefix must be unique",
    ),
    (
        _with({}, {"deployments": [{"name": "A"}, {"name": "A", "num_replicas": 2}]}),
        "applications[0].deployments[1].name: 'A' is also the name of deployments[0]: "
        "each name must be unique",
    ),
    (
        _with({}, {"runtime_env": {"env_vars": {"A": 1}}}),
        "applications[0].runtime_env.env_vars: {'A': 1} is invalid",
    ),
    (
        _with({}, {"deployments": [{"name": "A", "autoscaling_config": {"max_replicas": 0}}]}),
        "applications[0].deployments[0].autoscaling_config.max_replicas: 0",
    ),
    (
        _with({"grpc_options": {"port": 70000, "grpc_servicer_functions": []}}),
        "grpc_options.port: 70000",
    ),
    (
        _with({"logging_config": {"log_level": "LOUD"}}),
        "logging_config.log_level: 'LOUD' must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL",
    ),
    (
        _with({}, {"logging_config": {"encoding": "XML"}}),
        "applications[0].logging_config.encoding: 'XML'",
    ),
    (
        _with({}, {"deployments": [{"name": "A", "logging_config": {"enable_access_log": "no"}}]}),
        "applications[0].deployments[0].logging_config.enable_access_log: 'no'",
    ),
    (
        _with({}, {"direct_ingress_port": 0}),
        "applications[0].direct_ingress_port: 0 is not >= 1",
    ),
    (
        _with({"target_capacity": 150}),
        "target_capacity: 150 is not <= 100.0",
    ),
    (
        _with({}, {"deployments": [{"name": "A", "user_config": {"f": {1, 2}}}]}),
        "applications[0].deployments[0].user_config: {'f': {1, 2}} must be JSON-serializable",
    ),
]


@pytest.mark.parametrize(("data", "expected"), ERRORS, ids=[e for _, e in ERRORS])
def test_each_problem_is_one_line_with_its_path_and_value(data: Any, expected: str) -> None:
    lines = _error(data).splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"serve.yaml: {expected}"), lines[0]


def test_every_problem_is_reported_at_once() -> None:
    data = _with(
        {"http_options": {"port": -1, "hots": "x"}},
        {"deployments": [{"name": "A", "num_replicas": -1}, {"name": "B", "num_replicas": -2}]},
    )
    assert _error(data).splitlines() == [
        "serve.yaml: http_options.hots: unknown key (did you mean 'host'?); valid keys: host, "
        "keep_alive_timeout_s, max_ongoing_requests, max_request_body_bytes, port, "
        "request_timeout_s, root_path",
        "serve.yaml: http_options.port: -1 is not >= 0",
        "serve.yaml: applications[0].deployments[0].num_replicas: -1 is not >= 0",
        "serve.yaml: applications[0].deployments[1].num_replicas: -2 is not >= 0",
    ]


def test_rays_default_grpc_section_is_accepted() -> None:
    config = parse_config(
        _with({"grpc_options": {"port": 9000, "grpc_servicer_functions": []},
               "target_capacity": None}),
        "serve.yaml",
    )  # fmt: skip
    assert config.grpc_options is not None and config.grpc_options.port == 9000


def test_logging_config_of_the_deployment_then_application_then_file_applies() -> None:
    """Ray's rule: a deployment's own logging_config wins, else its application's, else
    the file's top-level one (docs/logging.md); each is validated by field."""
    file = {"logging_config": {"log_level": "ERROR", "enable_access_log": False}}
    translator = {"name": "Translator", "logging_config": {"encoding": "JSON"}}
    built = build_applications(parse_config(_with(file, {"deployments": [translator]}), "s.yaml"))
    configs = {name: c["logging_config"] for name, c in _configs(built[0].app).items()}
    assert configs == {
        "Summarizer": {"log_level": "ERROR", "enable_access_log": False},
        "Translator": {"encoding": "JSON"},  # its own: nothing of the file's merged in
    }
    app_level = {"logging_config": {"log_level": "DEBUG"}}
    built = build_applications(parse_config(_with(file, app_level), "s.yaml"))
    logging = [c["logging_config"]["log_level"] for c in _configs(built[0].app).values()]
    assert logging == ["DEBUG", "DEBUG"]


def test_rays_legacy_single_application_format_is_refused_with_the_new_form() -> None:
    message = _error({
        "import_path": "fruit:deployment_graph", "host": "0.0.0.0", "port": 8000,
        "deployments": [{"name": "MangoStand", "user_config": {"price": 3}}],
    })  # fmt: skip
    assert "single-application config format" in message
    suggested = yaml.safe_load(message.split("\n\n", 1)[1])
    assert suggested == {
        "http_options": {"host": "0.0.0.0", "port": 8000},
        "applications": [{
            "name": "default", "route_prefix": "/", "import_path": "fruit:deployment_graph",
            "deployments": [{"name": "MangoStand", "user_config": {"price": 3}}],
        }],
    }  # fmt: skip
    parse_config(suggested, "suggested")  # what it suggests is valid


# --- reading files ----------------------------------------------------------------------------


def test_file_problems_name_the_file_and_line(tmp_path: Path) -> None:
    def error(text: str | None, name: str = "serve.yaml") -> str:
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        with pytest.raises(ConfigError) as info:
            load_config_file(str(path))
        return str(info.value)

    assert error("applications:\n  - name: a\n    import_path: [x\n").startswith(
        f"{tmp_path}/serve.yaml, line 4: invalid YAML"
    )
    assert error("applications: []\napplications: []\n") == (
        f"{tmp_path}/serve.yaml, line 2: invalid YAML: duplicate key 'applications'"
    )
    assert error('{"applications": [}', "c.json").startswith(
        f"{tmp_path}/c.json, line 1: invalid JSON"
    )
    assert error("- a\n- b\n") == (
        f"{tmp_path}/serve.yaml: a Serve config is a mapping with an 'applications' list, "
        "got list ['a', 'b']"
    )
    assert "the config is empty" in error("")
    assert error(None, "missing.yaml") == (
        f"{tmp_path}/missing.yaml: cannot read the config file (No such file or directory)"
    )


def test_validation_problems_in_a_file_name_their_line_in_file_order(tmp_path: Path) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text(
        textwrap.dedent("""\
        http_options:
          port: -1
        applications:
        - name: a
          import_path: m:app
          deployments:
          - name: A
            num_replicas: -1
        - name: b
          route_prefix: /b
          imprt_path: x
    """)
    )
    with pytest.raises(ConfigError) as info:
        load_config_file(str(path))
    assert [line.rsplit(" ", 2)[1:] for line in str(info.value).splitlines()] == [
        ["(line", "2)"],  # http_options.port
        ["(line", "8)"],  # applications[0].deployments[0].num_replicas
        ["(line", "9)"],  # applications[1].import_path is missing: the entry's line
        ["(line", "11)"],  # applications[1].imprt_path
    ]
    assert str(info.value).splitlines()[0] == (
        f"{path}: http_options.port: -1 is not >= 0 (line 2)"
    )


# --- builders ---------------------------------------------------------------------------------


def _build(app: dict[str, Any]) -> list[BuiltApp]:
    return build_applications(parse_config({"applications": [app]}, "serve.yaml"))


def _build_error(app: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        _build(app)
    return str(info.value)


def test_a_builder_gets_its_args_as_a_dict() -> None:
    (built,) = _build({
        "import_path": "config_fixture_apps:build_from_dict", "args": {"greeting": "Hi"},
    })  # fmt: skip
    assert built.app.args == ("Hi", 1)


def test_a_builder_gets_its_args_validated_into_its_pydantic_model() -> None:
    (built,) = _build({
        "import_path": "config_fixture_apps:build_greeter", "args": {"greeting": "Hi", "times": 3}
    })  # fmt: skip
    assert built.app.args == ("Hi", 3)
    message = _build_error({
        "import_path": "config_fixture_apps:build_greeter", "args": {"times": "many"}
    })  # fmt: skip
    assert message.splitlines()[:2] == [
        "applications[0].args.greeting: required, but missing",
        "applications[0].args.times: 'many' is not an integer",
    ]


def test_args_for_an_application_are_refused() -> None:
    assert _build_error({"import_path": "config_fixture_apps:app", "args": {"a": 1}}).startswith(
        "applications[0].args: {'a': 1}: config_fixture_apps:app is an "
        "application, not a builder function, so it takes no args"
    )


def test_a_builder_must_return_an_application(tmp_path: Path) -> None:
    module = _module(tmp_path, "cfg_not_app", "def build(args):\n    return 42\n")
    assert _build_error({
        "import_path": f"{module}:build", "runtime_env": {"working_dir": str(tmp_path)}
    }) == (
        "applications[0].import_path: 'cfg_not_app:build': the builder cfg_not_app:build "
        "returned 42, not an application; return Deployment.bind(...)"
    )  # fmt: skip


def _module(tmp_path: Path, name: str, source: str) -> str:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    return name


IMPORT_ERRORS = {
    "cfg_no_such_module:app": "'cfg_no_such_module:app': no module named 'cfg_no_such_module'",
    "cfg_syntax:app": "'cfg_syntax:app': syntax error in {dir}/cfg_syntax.py, line 1",
    "cfg_raises:app": "'cfg_raises:app': importing 'cfg_raises' failed at {dir}/cfg_raises.py, "
    "line 2: RuntimeError: no weights",
    "cfg_builder_raises:build": "'cfg_builder_raises:build': building the application "
    "cfg_builder_raises:build() failed at {dir}/cfg_builder_raises.py, line 2: "
    "KeyError: 'model'",
    "config_fixture_apps:ap": "'config_fixture_apps:ap': module 'config_fixture_apps' has no "
    "attribute 'ap'; its applications: app",
    "config_fixture_apps:Translator": "'config_fixture_apps:Translator': "
    "config_fixture_apps:Translator is a deployment, not an application",
}


@pytest.mark.parametrize("import_path", sorted(IMPORT_ERRORS))
def test_import_failures_name_the_import_path(tmp_path: Path, import_path: str) -> None:
    _module(tmp_path, "cfg_syntax", "def f(:\n")
    _module(tmp_path, "cfg_raises", "import os\nraise RuntimeError('no weights')\n")
    _module(tmp_path, "cfg_builder_raises", "def build(args):\n    return args['model']\n")
    message = _build_error({
        "import_path": import_path, "runtime_env": {"working_dir": str(tmp_path)}
    })  # fmt: skip
    expected = IMPORT_ERRORS[import_path].format(dir=tmp_path)
    assert message.startswith(f"applications[0].import_path: {expected}"), message


def test_runtime_env_paths_are_importable_only_while_importing(tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "data.txt").write_text("from the working_dir")
    _module(code, "cfg_workdir_app", """
        from shoal import serve

        GREETING = open("data.txt").read()  # relative to working_dir while importing

        @serve.deployment(ray_actor_options={"runtime_env": {"env_vars": {"A": "code", "B": "b"}}})
        class Echo:
            def __call__(self, text):
                return GREETING

        app = Echo.bind()
    """)  # fmt: skip
    before_path, before_cwd = list(sys.path), os.getcwd()
    os.chdir(tmp_path)
    try:
        (built,) = _build({
            "import_path": "cfg_workdir_app:app",
            "runtime_env": {"working_dir": "code", "env_vars": {"A": "app", "C": "c"}},
        })  # fmt: skip
        assert os.getcwd() == str(tmp_path)
        assert str(code) not in sys.path
    finally:
        os.chdir(before_cwd)
        sys.path[:] = before_path
    assert sys.modules["cfg_workdir_app"].GREETING == "from the working_dir"
    # Ray's rule: the app's runtime_env goes to every deployment; the deployment's own keys
    # win, env_vars are merged. Relative paths become absolute.
    assert built.app.deployment.ray_actor_options["runtime_env"] == {
        "working_dir": str(code), "env_vars": {"A": "code", "B": "b", "C": "c"},
    }  # fmt: skip


def test_a_missing_working_dir_is_named(tmp_path: Path) -> None:
    message = _build_error({
        "import_path": "m:app", "runtime_env": {"working_dir": str(tmp_path / "nope")}
    })  # fmt: skip
    assert message.startswith(
        f"applications[0].runtime_env.working_dir: '{tmp_path}/nope' is not a directory"
    )


# --- deployment overrides ---------------------------------------------------------------------


def test_only_the_keys_the_file_sets_override_the_code() -> None:
    (built,) = _build({
        "import_path": "config_fixture_apps:app",
        "deployments": [{"name": "Summarizer", "graceful_shutdown_timeout_s": 3.0}],
    })  # fmt: skip
    assert _configs(built.app) == {
        "Summarizer": {"max_ongoing_requests": 7, "graceful_shutdown_timeout_s": 3.0},
        "Translator": {"ray_actor_options": {"num_cpus": 1, "num_gpus": 0.5}},
    }
    translator = deployment_names(built.app)[1][0]
    original = __import__("config_fixture_apps").app.args[0]
    assert translator is original  # an untouched deployment is shared, not copied


def test_overrides_reach_the_second_binding_of_a_deployment_by_its_app_name(
    tmp_path: Path,
) -> None:
    _module(tmp_path, "cfg_twice", """
        from shoal import serve

        @serve.deployment
        class Model:
            def __init__(self, size):
                self.size = size

        @serve.deployment
        class Ingress:
            def __init__(self, small, large, again):
                pass

        small = Model.bind(1)
        app = Ingress.bind(small, Model.bind(2), small)
    """)  # fmt: skip
    (built,) = _build({
        "import_path": "cfg_twice:app", "runtime_env": {"working_dir": str(tmp_path)},
        "deployments": [{"name": "Model_1", "num_replicas": 3, "user_config": {"k": 1}}],
    })  # fmt: skip
    nodes = dict((name, node) for node, name in deployment_names(built.app))
    assert list(nodes) == ["Ingress", "Model", "Model_1"]
    assert nodes["Model_1"].deployment.num_replicas == 3
    assert nodes["Model_1"].deployment.user_config == {"k": 1}
    assert nodes["Model"].deployment.num_replicas is None
    small, _, again = built.app.args
    assert small is again  # one bound node stays one deployment


def test_an_override_for_an_unknown_deployment_lists_the_deployments() -> None:
    assert _build_error({
        "import_path": "config_fixture_apps:app", "deployments": [{"name": "Translater"}]
    }) == (
        "applications[0].deployments[0].name: 'Translater' is not a deployment of "
        "config_fixture_apps:app; its deployments: Summarizer, Translator"
    )  # fmt: skip


def test_an_override_that_conflicts_with_the_code_names_the_entry(tmp_path: Path) -> None:
    _module(tmp_path, "cfg_auto", """
        from shoal import serve

        @serve.deployment(num_replicas=2, user_config={"a": 1})
        class Model:
            pass

        app = Model.bind()
    """)  # fmt: skip
    (built,) = _build({
        "import_path": "cfg_auto:app", "runtime_env": {"working_dir": str(tmp_path)},
        "deployments": [{"name": "Model", "user_config": {"b": 2}}],
    })  # fmt: skip
    assert built.app.deployment.user_config == {"b": 2}  # replaced whole, as in Ray
    assert built.app.deployment.num_replicas == 2


def test_the_load_target_used_by_the_cli_accepts_rays_dotted_form() -> None:
    assert load_target("config_fixture_apps.app") is __import__("config_fixture_apps").app
    with pytest.raises(ConfigError, match=r"^expected MODULE:ATTRIBUTE .* got 'nodots'"):
        load_target("nodots")


# --- serve build ------------------------------------------------------------------------------


def test_config_for_writes_what_ray_serve_build_writes_and_builds_the_same_app() -> None:
    original = build_applications(load_config_file(str(RAY_CONFIG)))[0].app
    written = config_for("config_fixture_apps:app", original, "text_ml", "/ml")
    assert written == {
        "proxy_location": "EveryNode",
        "http_options": {"host": "127.0.0.1", "port": 8000},
        "grpc_options": {"port": 9000, "grpc_servicer_functions": []},
        "logging_config": {
            "encoding": "TEXT", "log_level": "INFO", "logs_dir": None, "enable_access_log": True,
        },
        "applications": [{
            "name": "text_ml", "route_prefix": "/ml", "import_path": "config_fixture_apps:app",
            "runtime_env": {},
            "deployments": [
                {"name": "Summarizer", "num_replicas": 1, "max_ongoing_requests": 7,
                 "health_check_period_s": 5.0},
                {"name": "Translator", "num_replicas": 2, "user_config": {"language": "french"},
                 "ray_actor_options": {"num_cpus": 0.2, "num_gpus": 0.0}},
            ],
        }],
    }  # fmt: skip
    text = yaml.safe_dump(written, sort_keys=False)
    (rebuilt,) = build_applications(parse_config(yaml.safe_load(text), "built.yaml"))
    assert (rebuilt.name, rebuilt.route_prefix) == ("text_ml", "/ml")
    assert _configs(rebuilt.app) == _configs(original)


# --- end to end -------------------------------------------------------------------------------

E2E_MODULE = """
from pydantic import BaseModel
from starlette.requests import Request

from shoal import serve


@serve.deployment
class Adder:
    def __init__(self):
        self.amount = 0

    def reconfigure(self, config):
        self.amount = config["amount"]

    def add(self, x):
        return x + self.amount


@serve.deployment
class Calculator:
    def __init__(self, adder, label):
        self.adder, self.label = adder, label

    async def __call__(self, request: Request):
        x = int(request.query_params["x"])
        return {"label": self.label, "result": await self.adder.add.remote(x)}


class Args(BaseModel):
    label: str


def build(args: Args):
    return Calculator.bind(Adder.bind(), args.label)
"""

E2E_CONFIG = """
proxy_location: EveryNode
http_options: {{host: 127.0.0.1, port: {port}}}
applications:
- name: calc
  route_prefix: /calc
  import_path: cfg_e2e_calc:build
  args: {{label: sum}}
  runtime_env:
    working_dir: {workdir}
  deployments:
  - name: Adder
    num_replicas: 2
    user_config: {{amount: 10}}
"""


def test_a_config_file_deploys_and_serves_over_http(tmp_path: Path, http_port: int) -> None:
    workdir = tmp_path / "code"
    workdir.mkdir()
    (workdir / "cfg_e2e_calc.py").write_text(E2E_MODULE)
    path = tmp_path / "serve.yaml"
    path.write_text(E2E_CONFIG.format(port=http_port, workdir=workdir))
    (built,) = build_applications(load_config_file(str(path)))
    try:
        serve.run(built.app, name=built.name, route_prefix=built.route_prefix)
        status = serve.status().applications["calc"]
        assert status.deployments["Adder"].replica_states == {"RUNNING": 2}
        reply = httpx.get(f"http://127.0.0.1:{http_port}/calc?x=5", timeout=30)
        assert reply.json() == {"label": "sum", "result": 15}
    finally:
        serve.delete("calc")


# --- docs and public names --------------------------------------------------------------------


def test_the_config_reference_is_generated_from_the_schema() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "config_reference.py"), "--stdout"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    committed = (ROOT / "docs" / "config-reference.md").read_text()
    assert committed == result.stdout, (
        "docs/config-reference.md is out of date: run `python scripts/config_reference.py`"
    )


def test_ray_schema_names_are_exported() -> None:
    from shoal import _deploy_config
    from shoal.serve import schema

    for name in ("ServeDeploySchema", "ServeApplicationSchema", "DeploymentSchema"):
        assert getattr(schema, name) is getattr(_deploy_config, name)
        assert name in schema.__all__


def test_the_schema_module_is_a_bottom_layer() -> None:
    """The REST API, the CLI and the server all parse configs: it imports no runtime code."""
    import ast

    import shoal._deploy_config as module

    tree = ast.parse(Path(module.__file__).read_text())
    imported = {
        node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("shoal")
    } | {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
        if alias.name.startswith("shoal")
    }
    assert imported == {
        "shoal._config",
        "shoal._config.support",
        "shoal._config_text",
        "shoal._errors",
    }


def test_the_runtime_fields_choose_ray_and_an_address_needs_it() -> None:
    app = {"name": "a", "import_path": "config_fixture_apps:app"}
    config = parse_config({"runtime": "ray", "ray_address": "auto", "applications": [app]}, "f")
    assert (config.runtime, config.ray_address) == ("ray", "auto")
    assert "serve.yaml: ray_address: 'auto' needs runtime: ray" in _error(
        {"ray_address": "auto", "applications": [app]}
    )
    assert "runtime" in _error({"runtime": "kubernetes", "applications": [app]})
