"""The production compose file and Dockerfile, checked without a Docker engine.

Structure and pinning, the worker's environment against what ``settings.Settings`` reads, and the
shell scripts of the one-shot jobs run under /bin/sh against recording stand-ins for the
``temporal`` and ``temporal-sql-tool`` binaries of the admin-tools image.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import yaml
from sqlalchemy.engine import make_url

from settings import DeliveryMode, Settings
from workflows import search

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
COMPOSE_TEXT = COMPOSE_FILE.read_text()
COMPOSE = yaml.safe_load(COMPOSE_TEXT)
SERVICES: dict[str, dict] = COMPOSE["services"]
WORKER_ENV: dict[str, str | None] = SERVICES["worker"]["environment"]

REQUIRED_SERVICES = {"postgresql", "temporal", "temporal-ui", "register-search-attributes",
                     "migrate", "worker", "api"}
# Settings the worker cannot do without in a container: where Temporal and the database are.
NEEDED = {"temporal_address", "temporal_namespace", "task_queue", "database_url", "delivery"}
# Live delivery's variables: passed through from the host, never given a value in the file.
PASSED_THROUGH = {"SENDGRID_API_KEY", "DUNNING_EMAIL_FROM", "TWILIO_ACCOUNT_SID",
                  "TWILIO_AUTH_TOKEN", "TWILIO_FROM_NUMBER", "DUNNING_AGENCY_WEBHOOK_URL",
                  "DUNNING_AGENCY_WEBHOOK_SECRET", "DUNNING_UNSUBSCRIBE_URL",
                  "DUNNING_VOICE_ACTION_URL", "DUNNING_PAYLOAD_KEYS", "DUNNING_PAY_URL_HOSTS",
                  "DUNNING_COMPANY_CONTACT", "DUNNING_DISPUTE_CONTACT", "DUNNING_CEASE_CONFIRMATION",
                  "DUNNING_PROVIDER_TIMEOUT_SECONDS"}
SHELL = shutil.which("sh")
needs_sh = pytest.mark.skipif(SHELL is None, reason="no POSIX sh to run the job scripts with")

_INTERPOLATION = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?)-([^}]*))?\}")


def interpolate(text: str, host: dict[str, str]) -> str:
    """Compose's interpolation of the forms this file uses: $$, ${NAME}, ${NAME:-x}, ${NAME-x}."""

    def substitute(match: re.Match[str]) -> str:
        name, colon, default = match.groups()
        if name is None:
            return "$"
        value = host.get(name)
        if default is None:
            return value or ""
        if value is None or (colon and value == ""):
            return default
        return value

    return _INTERPOLATION.sub(substitute, text)


def env_names() -> dict[str, str]:
    """Every environment variable Settings reads, mapped to its field."""
    names: dict[str, str] = {}
    prefix = Settings.model_config.get("env_prefix", "")
    for field, info in Settings.model_fields.items():
        alias = info.validation_alias
        if alias is None:
            names[f"{prefix}{field}".upper()] = field
        else:
            for choice in getattr(alias, "choices", [alias]):
                names[str(choice)] = field
    return names


def container_env(host: dict[str, str]) -> dict[str, str]:
    """The worker's environment as compose would hand it over, given the host's variables."""
    resolved = {}
    for name, value in WORKER_ENV.items():
        if value is None:  # pass-through: the host's value, or nothing at all
            if name in host:
                resolved[name] = host[name]
        else:
            resolved[name] = interpolate(str(value), host)
    return resolved


def settings_in_container(monkeypatch: pytest.MonkeyPatch, host: dict[str, str]) -> Settings:
    for name in env_names():
        monkeypatch.delenv(name, raising=False)
    for name, value in container_env(host).items():
        monkeypatch.setenv(name, value)
    return Settings()


def build_context(service: dict) -> Path:
    build = service["build"]
    context = build if isinstance(build, str) else build.get("context", ".")
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    return (ROOT / context / dockerfile).resolve()


def image_tag(image: str) -> str | None:
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else None


def script_of(service: str, host: dict[str, str] | None = None) -> str:
    command = SERVICES[service]["command"]
    assert SERVICES[service]["entrypoint"] == ["/bin/sh", "-c"]
    assert isinstance(command, list) and len(command) == 1, "one script for sh -c"
    return interpolate(command[0], host or {})


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = (line.strip() for line in text.splitlines())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1])
            for line in lines if line and not line.startswith("#")]


# -- structure --------------------------------------------------------------------------------


def test_every_production_part_is_there():
    assert SERVICES.keys() >= REQUIRED_SERVICES


def test_the_worker_and_the_migration_are_built_from_this_repository():
    for name in ("worker", "migrate", "api"):
        assert "image" not in SERVICES[name]
        assert build_context(SERVICES[name]) == ROOT / "Dockerfile", name
    assert SERVICES["migrate"]["command"] == ["migrate"]
    assert SERVICES["worker"]["command"] == ["worker"]


def test_every_image_is_pinned():
    for name, service in SERVICES.items():
        if "build" in service:
            continue
        tag = image_tag(service["image"])
        assert tag and tag != "latest", f"{name}: {service['image']} is not pinned"
    assert SERVICES["temporal"]["image"].startswith("temporalio/server:")
    assert SERVICES["temporal-ui"]["image"].startswith("temporalio/ui:")
    assert SERVICES["postgresql"]["image"].startswith("postgres:16")


def test_admin_tools_match_the_server_version():
    """The schema belongs to a server version: the sql tool and the server move together."""
    server = image_tag(SERVICES["temporal"]["image"])
    for name in ("temporal-admin-tools", "register-search-attributes"):
        image = SERVICES[name]["image"]
        assert image.startswith("temporalio/admin-tools:"), name
        assert image_tag(image) == server, f"{name} runs {image}, the server is {server}"


def test_dependencies_exist_and_are_ordered():
    conditions = {"service_started", "service_healthy", "service_completed_successfully"}
    for name, service in SERVICES.items():
        depends = service.get("depends_on", {})
        missing = set(depends) - SERVICES.keys()
        assert not missing, f"{name} depends on undefined {sorted(missing)}"
        if isinstance(depends, dict):
            for target, spec in depends.items():
                assert spec["condition"] in conditions, (name, target)
    worker = SERVICES["worker"]["depends_on"]
    assert worker["migrate"]["condition"] == "service_completed_successfully"
    assert worker["register-search-attributes"]["condition"] == "service_completed_successfully"
    assert "temporal" in worker
    assert SERVICES["migrate"]["depends_on"]["postgresql"]["condition"] == "service_healthy"
    temporal = SERVICES["temporal"]["depends_on"]
    assert temporal["temporal-admin-tools"]["condition"] == "service_completed_successfully"
    assert temporal["postgresql"]["condition"] == "service_healthy"
    assert "pg_isready" in " ".join(SERVICES["postgresql"]["healthcheck"]["test"])


def test_every_interpolation_has_a_default():
    """A bare $ is compose interpolation: each must have a default, and the scripts' own shell
    variables must be written $$ (or compose would substitute them, empty, at parse time)."""
    without_escapes = COMPOSE_TEXT.replace("$$", "")
    for match in re.finditer(r"\$", without_escapes):
        rest = without_escapes[match.start():]
        assert re.match(r"\$\{[A-Z_][A-Z0-9_]*:-[^}$]*\}", rest), f"bare {rest[:40]!r}"


def test_postgresql_is_configured_from_the_host_with_defaults():
    env = SERVICES["postgresql"]["environment"]
    for name in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"):
        assert re.fullmatch(rf"\$\{{{name}:-\w+\}}", env[name]), env[name]
    assert "postgresql-data" in COMPOSE["volumes"]
    assert any(volume.startswith("postgresql-data:")
               for volume in SERVICES["postgresql"]["volumes"])


def test_temporal_uses_the_same_postgresql():
    db = SERVICES["postgresql"]["environment"]
    server = SERVICES["temporal"]["environment"]
    tools = SERVICES["temporal-admin-tools"]["environment"]
    assert server["DB"] == "postgres12"
    assert server["POSTGRES_SEEDS"] == tools["SQL_HOST"] == "postgresql"
    assert str(server["DB_PORT"]) == str(tools["SQL_PORT"]) == "5432"
    assert server["POSTGRES_USER"] == tools["SQL_USER"] == db["POSTGRES_USER"]
    assert server["POSTGRES_PWD"] == tools["SQL_PASSWORD"] == db["POSTGRES_PASSWORD"]
    assert "--plugin postgres12" in script_of("temporal-admin-tools")
    ui = SERVICES["temporal-ui"]
    assert ui["environment"]["TEMPORAL_ADDRESS"] == "temporal:7233"
    assert any(str(port).endswith("8080:8080") for port in ui["ports"])
    dynamic = server["DYNAMIC_CONFIG_FILE_PATH"]
    mounted = {config["target"] for config in SERVICES["temporal"]["configs"]}
    assert f"/etc/temporal/{dynamic}" in mounted
    for config in SERVICES["temporal"]["configs"]:
        assert isinstance(yaml.safe_load(COMPOSE["configs"][config["source"]]["content"]), dict)


# -- the worker's environment -------------------------------------------------------------------


def test_worker_environment_is_read_by_settings():
    known = env_names()
    unknown = set(WORKER_ENV) - known.keys()
    assert not unknown, f"Settings reads none of {sorted(unknown)}"
    assert {known[name] for name in WORKER_ENV} >= NEEDED, "worker lacks a needed setting"


def test_migrate_and_api_share_the_worker_environment():
    assert SERVICES["migrate"]["environment"] == WORKER_ENV
    assert SERVICES["api"]["environment"] == WORKER_ENV
    assert re.search(r"^x-dunning-env: &dunning-env$", COMPOSE_TEXT, re.M)
    assert len(re.findall(r"environment: \*dunning-env$", COMPOSE_TEXT, re.M)) == 3


def test_the_api_is_published_on_loopback_only():
    assert SERVICES["api"]["command"][0] == "api"
    assert SERVICES["api"]["ports"] == ["127.0.0.1:8000:8000"]
    assert "DUNNING_API_KEYS" in WORKER_ENV and WORKER_ENV["DUNNING_API_KEYS"] is None


def test_live_delivery_variables_come_from_the_host():
    assert WORKER_ENV["DUNNING_DELIVERY"] == "${DUNNING_DELIVERY:-outbox}"
    for name in PASSED_THROUGH:
        assert name in WORKER_ENV, name
        # No value: unset on the host stays unset. "${X:-}" would set "" instead, which reads as
        # a real (empty) sender address, unsubscribe URL or voice action.
        assert WORKER_ENV[name] is None, f"{name} is not passed through from the host"


def test_database_url_is_psycopg_on_the_postgresql_service():
    url = make_url(interpolate(WORKER_ENV["DUNNING_DATABASE_URL"], {}))
    db = {name: interpolate(value, {})
          for name, value in SERVICES["postgresql"]["environment"].items()}
    assert url.drivername == "postgresql+psycopg"
    assert url.host == "postgresql" and url.port == 5432
    assert url.username == db["POSTGRES_USER"]
    assert url.password == db["POSTGRES_PASSWORD"]
    assert url.database == db["POSTGRES_DB"]
    host = {"POSTGRES_USER": "ops", "POSTGRES_PASSWORD": "s3cret", "POSTGRES_DB": "billing"}
    url = make_url(interpolate(WORKER_ENV["DUNNING_DATABASE_URL"], host))
    assert (url.username, url.password, url.database) == ("ops", "s3cret", "billing")


def test_settings_in_the_container_by_default(monkeypatch):
    settings = settings_in_container(monkeypatch, {})
    assert settings.temporal_address == "temporal:7233"
    assert settings.temporal_namespace == "default"
    assert settings.task_queue == "dunning"
    assert settings.delivery is DeliveryMode.OUTBOX
    assert make_url(settings.database()).host == "postgresql"
    defaults = Settings.model_fields
    assert settings.email_from == defaults["email_from"].default
    assert settings.unsubscribe_url is None and settings.voice_action_url is None
    assert settings.sendgrid_api_key is None and settings.agency_webhook_url is None


def test_settings_in_the_container_with_live_delivery(monkeypatch):
    host = {"DUNNING_DELIVERY": "live", "SENDGRID_API_KEY": "SG.key", "TWILIO_ACCOUNT_SID": "AC1",
            "TWILIO_AUTH_TOKEN": "token", "TWILIO_FROM_NUMBER": "+15550100",
            "DUNNING_EMAIL_FROM": "ar@example.org", "DUNNING_TEMPORAL_NAMESPACE": "billing",
            "DUNNING_VOICE_ACTION_URL": "https://pay.example.org/voice"}
    settings = settings_in_container(monkeypatch, host)
    assert settings.delivery is DeliveryMode.LIVE
    assert settings.sendgrid_api_key and settings.sendgrid_api_key.get_secret_value() == "SG.key"
    assert settings.twilio_from_number == "+15550100"
    assert settings.email_from == "ar@example.org"
    assert settings.temporal_namespace == "billing"
    assert settings.voice_action_url == "https://pay.example.org/voice"
    del host["TWILIO_AUTH_TOKEN"]
    with pytest.raises(ValueError, match="TWILIO_AUTH_TOKEN"):
        settings_in_container(monkeypatch, host)


# -- the Dockerfile ---------------------------------------------------------------------------


def test_dockerfile_runs_the_console_script_as_a_user():
    instructions = dockerfile_instructions()
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    entrypoint = [args for op, args in instructions if op == "ENTRYPOINT"]
    assert [json.loads(args) for args in entrypoint] == [["dunning"]]
    assert "dunning" in scripts
    assert [json.loads(args) for op, args in instructions if op == "CMD"] == [["worker"]]
    assert instructions[0] == ("FROM", "python:3.11-slim")
    runs = [args for op, args in instructions if op == "RUN"]
    assert any("--require-hashes -r /app/requirements.lock" in args for args in runs)  # the lock
    assert any("--no-deps --no-build-isolation -e /app" in args for args in runs)
    users = [(index, args) for index, (op, args) in enumerate(instructions) if op == "USER"]
    assert users and users[-1][1] not in {"root", "0"}, "the worker does not run as root"
    last_run = max(index for index, (op, _) in enumerate(instructions) if op == "RUN")
    assert users[-1][0] > last_run


def test_the_image_has_the_font_the_letter_looks_for():
    """The slim base image has no font: without one, letters fall back to Latin-1."""
    from activities.letter import FONTS

    instructions = dockerfile_instructions()
    fonts = [args for op, args in instructions if op == "ARG" and args.startswith("LETTER_FONTS=")]
    assert fonts and "fonts-dejavu-core" in fonts[0]
    assert any("apt-get install" in args and "${LETTER_FONTS}" in args
               for op, args in instructions if op == "RUN")
    assert Path("/usr/share/fonts/truetype/dejavu") in FONTS  # where Debian's package puts it


def test_dockerignore_keeps_local_state_out_of_the_image():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".git", ".dunning", ".pytest_cache"} <= ignored
    assert ignored & {"__pycache__", "**/__pycache__"}
    assert not ignored & {"templates", "policies", "tests"}


# -- the one-shot jobs, run against stand-ins ---------------------------------------------------

FAKE_TEMPORAL = """
    import json, os, sys
    args = sys.argv[1:]
    state_file = os.environ["FAKE_STATE"]
    state = json.load(open(state_file))
    state["calls"].append(args)

    def flag(name):
        return args[args.index(name) + 1]

    def done(code, message):
        json.dump(state, open(state_file, "w"))
        print(message, file=sys.stderr if code else sys.stdout)
        sys.exit(code)

    if args[:3] == ["operator", "cluster", "health"]:
        state["unhealthy"] -= 1
        if state["unhealthy"] >= 0:
            done(1, "failed checking cluster health: connection refused")
        done(0, "SERVING")
    if args[:2] == ["operator", "namespace"]:
        namespace = flag("--namespace")
        if args[2] == "describe":
            done(0 if namespace in state["namespaces"] else 1, "Namespace " + namespace)
        state["namespaces"].append(namespace)
        done(0, "Namespace " + namespace + " successfully registered.")
    if args[:3] == ["operator", "search-attribute", "create"]:
        namespace, name, kind = flag("--namespace"), flag("--name"), flag("--type")
        if namespace not in state["namespaces"]:
            done(1, "Namespace " + namespace + " is not found.")
        existing = state["attributes"].setdefault(namespace, {})
        if name in existing and existing[name] != kind:
            done(1, "search attribute " + name + " already exists and has different type")
        if name in existing:
            done(1, "unable to add search attributes: Search attribute " + name
                 + " already exists.")
        existing[name] = kind
        done(0, "Search attributes have been added")
    done(2, "unexpected call")
"""

FAKE_SQL_TOOL = """
    import json, os, sys
    args = sys.argv[1:]
    state_file = os.environ["FAKE_STATE"]
    state = json.load(open(state_file))
    state["calls"].append(args)
    json.dump(state, open(state_file, "w"))
    if os.environ.get("SQL_HOST") != "postgresql":
        sys.exit("missing SQL_HOST")
    if state["down"]:
        sys.exit("Unable to connect to SQL database. dial tcp: connection refused")
    db = args[args.index("--db") + 1]
    if "create-database" in args and db in state["databases"]:
        sys.exit('Unable to create SQL database. pq: database "' + db + '" already exists')
"""


class Job:
    """A job's script under /bin/sh, with its image's binaries replaced by recording fakes."""

    def __init__(self, tmp_path: Path, service: str, fakes: dict[str, str], **state: object):
        self.service = service
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        for name, body in {**fakes, "sleep": "pass"}.items():
            fake = self.bin / name
            fake.write_text(f"#!{sys.executable}\n{textwrap.dedent(body)}")
            fake.chmod(0o755)
        self.state_file = tmp_path / "state.json"
        self.state = {"calls": [], **state}
        self.environment = {name: interpolate(str(value), {})
                            for name, value in SERVICES[service].get("environment", {}).items()}

    def run(self, host: dict[str, str] | None = None,
            replace: tuple[str, str] = ("", "")) -> subprocess.CompletedProcess[str]:
        self.state_file.write_text(json.dumps(self.state))
        script = script_of(self.service, host).replace(*replace)
        env = {**self.environment, "PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}",
               "FAKE_STATE": str(self.state_file)}
        result = subprocess.run([SHELL, "-c", script], env=env, capture_output=True, text=True,
                                timeout=60)
        self.state = json.loads(self.state_file.read_text())
        return result


def created_attributes(calls: list[list[str]]) -> list[tuple[str, str, str, str]]:
    return [(call[call.index("--address") + 1], call[call.index("--namespace") + 1],
             call[call.index("--name") + 1], call[call.index("--type") + 1])
            for call in calls if call[:3] == ["operator", "search-attribute", "create"]]


def test_registration_script_names_exactly_our_search_attributes():
    lines = [shlex.split(line) for line in script_of("register-search-attributes").splitlines()
             if "search-attribute create" in line]
    created = sorted((call[call.index("--name") + 1], call[call.index("--type") + 1])
                     for call in lines)
    assert created == sorted((key.name, search.cli_type(key)) for key in search.ALL)


@needs_sh
def test_registration_job_creates_the_namespace_and_every_attribute(tmp_path):
    job = Job(tmp_path, "register-search-attributes", {"temporal": FAKE_TEMPORAL},
              unhealthy=2, namespaces=[], attributes={})
    result = job.run()
    assert result.returncode == 0, result.stderr
    assert job.state["namespaces"] == ["default"]
    expected = {key.name: search.cli_type(key) for key in search.ALL}
    assert job.state["attributes"] == {"default": expected}
    for call in job.state["calls"]:
        assert call[call.index("--address") + 1] == "temporal:7233", call
    calls = created_attributes(job.state["calls"])
    assert {(address, namespace) for address, namespace, _, _ in calls} == {
        ("temporal:7233", "default")}

    rerun = job.run()  # everything exists already, with the same types
    assert rerun.returncode == 0, rerun.stderr
    assert job.state["attributes"] == {"default": expected}


@needs_sh
def test_registration_job_follows_the_workers_namespace(tmp_path):
    job = Job(tmp_path, "register-search-attributes", {"temporal": FAKE_TEMPORAL},
              unhealthy=0, namespaces=[], attributes={})
    result = job.run({"DUNNING_TEMPORAL_NAMESPACE": "billing"})
    assert result.returncode == 0, result.stderr
    assert set(job.state["attributes"]) == {"billing"} and job.state["namespaces"] == ["billing"]
    assert WORKER_ENV["DUNNING_TEMPORAL_NAMESPACE"] == "${DUNNING_TEMPORAL_NAMESPACE:-default}"


@needs_sh
def test_registration_job_fails_on_an_attribute_of_another_type(tmp_path):
    job = Job(tmp_path, "register-search-attributes", {"temporal": FAKE_TEMPORAL},
              unhealthy=0, namespaces=["default"],
              attributes={"default": {search.AMOUNT_DUE.name: "Keyword"}})
    result = job.run()
    assert result.returncode != 0
    assert "different type" in result.stderr


@needs_sh
def test_schema_job_creates_and_updates_both_temporal_schemas(tmp_path):
    schema = tmp_path / "schema"
    for part in ("temporal", "visibility"):
        (schema / part / "versioned").mkdir(parents=True)
    job = Job(tmp_path, "temporal-admin-tools", {"temporal-sql-tool": FAKE_SQL_TOOL},
              down=False, databases=[])
    moved = ("/etc/temporal/schema/postgresql/v12", str(schema))
    assert moved[0] in script_of("temporal-admin-tools")
    result = job.run(replace=moved)
    assert result.returncode == 0, result.stderr
    calls = job.state["calls"]
    assert all(call[:2] == ["--plugin", "postgres12"] for call in calls)
    server = SERVICES["temporal"]["environment"]
    databases = {server["DBNAME"]: "temporal", server["VISIBILITY_DBNAME"]: "visibility"}
    for db, part in databases.items():
        steps = [call[4:] for call in calls if call[2:4] == ["--db", db]]
        assert steps == [["create-database"], ["setup-schema", "-v", "0.0"],
                         ["update-schema", "-d", str(schema / part / "versioned")]], db

    job.state.update(databases=list(databases), calls=[])  # a re-run on an existing cluster
    assert job.run(replace=moved).returncode == 0
    assert sum("update-schema" in call for call in job.state["calls"]) == 2

    job.state.update(down=True)
    assert job.run(replace=moved).returncode != 0, "a database that is down fails the job"
    job.state.update(down=False)
    shutil.rmtree(schema / "visibility")
    failed = job.run(replace=moved)
    assert failed.returncode != 0 and "no schema directory" in failed.stderr


# -- docker compose itself --------------------------------------------------------------------


def test_docker_compose_accepts_the_file():
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker client on this machine")
    try:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True,
                               timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"docker compose cannot run here: {exc}")
    if probe.returncode != 0:
        reason = (probe.stderr or probe.stdout).strip().splitlines()[:1]
        pytest.skip(f"docker compose is not available: {' '.join(reason)}")
    result = subprocess.run([docker, "compose", "-f", str(COMPOSE_FILE), "config", "-q"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
