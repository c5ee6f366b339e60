"""The production compose file, checked without a Docker engine: structure, and that the
worker's environment is exactly what the code reads."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from settings import Settings
from workflows import search

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def setting_names() -> set[str]:
    """Every environment variable Settings reads: DUNNING_<FIELD> and the provider aliases."""
    names = set()
    for field, info in Settings.model_fields.items():
        names.add(f"DUNNING_{field.upper()}")
        alias = info.validation_alias
        if alias is not None:
            names |= {str(choice) for choice in getattr(alias, "choices", [alias])}
    return names


def test_every_production_part_is_there():
    assert {"postgresql", "temporal", "temporal-ui", "register-search-attributes", "migrate",
            "worker"} <= SERVICES.keys()


def test_images_are_pinned_and_the_worker_is_built_here():
    for name, service in SERVICES.items():
        if "build" in service:
            assert service["build"] == "."
            continue
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name} uses {image}"
    assert "build" in SERVICES["worker"] and "build" in SERVICES["migrate"]


def test_worker_environment_matches_the_settings():
    environment = SERVICES["worker"]["environment"]
    known = setting_names()
    assert set(environment) <= known, set(environment) - known
    for needed in ("DUNNING_TEMPORAL_ADDRESS", "DUNNING_TEMPORAL_NAMESPACE", "DUNNING_TASK_QUEUE",
                   "DUNNING_DATABASE_URL", "DUNNING_DELIVERY"):
        assert needed in environment
    assert environment["DUNNING_TEMPORAL_ADDRESS"] == "temporal:7233"
    assert re.match(r"postgresql\+psycopg://.+@postgresql:5432/", environment["DUNNING_DATABASE_URL"])
    assert SERVICES["migrate"]["environment"] == environment
    for name in ("SENDGRID_API_KEY", "TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN", "TWILIO_FROM_NUMBER",
                 "DUNNING_AGENCY_WEBHOOK_URL", "DUNNING_AGENCY_WEBHOOK_SECRET"):
        assert environment[name] == f"${{{name}:-}}", "live credentials come from the host"


def test_worker_waits_for_its_schema_and_search_attributes():
    needs = SERVICES["worker"]["depends_on"]
    assert needs["migrate"]["condition"] == "service_completed_successfully"
    assert needs["register-search-attributes"]["condition"] == "service_completed_successfully"
    assert SERVICES["migrate"]["command"] == ["migrate"]
    for service in SERVICES.values():
        depends = service.get("depends_on", [])
        assert set(depends) <= SERVICES.keys()


def test_registration_job_creates_exactly_our_search_attributes():
    script = "\n".join(SERVICES["register-search-attributes"]["command"])
    created = dict(re.findall(r"(Dunning\w+)=(\w+)", script))
    assert created == {key.name: search.cli_type(key) for key in search.ALL}


def test_dockerfile_runs_the_console_script():
    dockerfile = (ROOT / "Dockerfile").read_text()
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert 'ENTRYPOINT ["dunning"]' in dockerfile and "dunning" in scripts
    assert re.search(r"^USER (?!root)", dockerfile, re.M), "the worker does not run as root"


def test_docker_compose_accepts_the_file():
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker client on this machine")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("the docker client has no compose plugin here")
    result = subprocess.run([docker, "compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
