"""compose.yaml (parsed with a real YAML parser, merge keys resolved) runs the same commands with
the same settings as the local launcher, and has what a deployment needs: Redis with AOF,
health checks, a shared model volume, a scalable inference service."""
import shlex
from pathlib import Path

import pytest
import yaml

from internlm_core.demo import DEMO_NAME
from services.auth import API_KEY_ENV, INTERNAL_TOKEN_ENV
from services.launcher import JOBS_QUEUES, redis_command, role_command, stack_env
from tests.helpers import REPO

APP = ["model-init", "tokenizer", "inference", "converter", "trainer", "endpoint"]


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((REPO / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def services(compose):
    return compose["services"]


def flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_the_parts(services):
    assert set(services) == {"redis", *APP}
    for name, s in services.items():
        for dep in s.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
        assert all(isinstance(a, str) for a in s["command"]), f"{name}: command must be a list of strings"


def test_commands_are_the_launchers(services):
    tok, inf, ep = services["tokenizer"]["command"], services["inference"]["command"], services["endpoint"]["command"]
    assert tok == ["python", *role_command("tokenizer", int(flag(tok, "--port")), int(flag(tok, "--metrics-port")))]
    assert inf == ["python", *role_command("inference", int(flag(inf, "--port")), int(flag(inf, "--metrics-port")),
                                           model=flag(inf, "--model"))]
    assert ep == ["python", *role_command("endpoint", int(flag(ep, "--port")), int(flag(ep, "--metrics-port")),
                                          tokenizer_address=flag(ep, "--tokenizer-address"),
                                          http_port=int(flag(ep, "--http-port")))]
    assert flag(ep, "--tokenizer-address") == f"tokenizer:{flag(tok, '--port')}"
    for role in JOBS_QUEUES:
        assert services[role]["command"] == ["python", *role_command(role)]
    r = services["redis"]["command"]
    assert r == redis_command(int(flag(r, "--port")), "/data", bind="0.0.0.0")
    assert flag(r, "--appendonly") == "yes" and flag(r, "--maxmemory-policy") == "noeviction"


def test_settings_are_the_launchers(services):
    """The launcher's settings, and the two secrets, which compose requires from the host's environment
    (no default: the parts listen beyond loopback and the endpoint's ports are published)."""
    redis_port = flag(services["redis"]["command"], "--port")
    expected = stack_env(f"redis://redis:{redis_port}/0", "/data/store", "0.0.0.0")
    for name in APP:
        env = dict(services[name]["environment"])
        for secret in (API_KEY_ENV, INTERNAL_TOKEN_ENV):
            assert env.pop(secret).startswith("${%s:?" % secret), (name, secret)
        assert env == expected, name


def test_one_model_store_shared_by_every_part(services):
    store = services["tokenizer"]["environment"]["INTERNLM_STORE"]
    for name in APP:
        assert f"store:{store}" in services[name]["volumes"], name
    model = Path(flag(services["inference"]["command"], "--model"))
    prepare = services["model-init"]["command"]
    assert prepare[:4] == ["python", "-m", "services.launcher", "prepare-model"]
    assert model == Path(flag(prepare, "--models-root")) / DEMO_NAME  # where ensure_demo_model puts it
    assert model.is_relative_to(store)
    assert services["inference"]["depends_on"]["model-init"] == {"condition": "service_completed_successfully"}
    assert "redis-data:/data" in services["redis"]["volumes"]


def test_health_checks_and_scaling(services):
    for name in ("tokenizer", "inference", "endpoint"):
        cmd = services[name]["command"]
        test = services[name]["healthcheck"]["test"]
        assert test == ["CMD", "python", "-m", "services.launcher", "health", f"localhost:{flag(cmd, '--port')}"]
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert services["inference"]["deploy"]["replicas"] >= 2
    assert "ports" not in services["inference"]  # replicas must not fight over a host port
    ep = services["endpoint"]["command"]
    published = {p.rsplit(":", 1)[1] for p in services["endpoint"]["ports"]}
    assert published == {flag(ep, "--port"), flag(ep, "--http-port")}  # not the metrics port
    assert f"{flag(ep, '--port')}:50051" in services["endpoint"]["ports"]
    assert all("ports" not in s for name, s in services.items() if name != "endpoint")
    assert services["endpoint"]["depends_on"]["tokenizer"] == {"condition": "service_healthy"}


def test_dockerfile_builds_what_compose_runs(compose):
    steps = [line.split(None, 1) for line in (REPO / "Dockerfile").read_text().splitlines()
             if line.strip() and not line.startswith("#") and not line.startswith(" ")]
    text = (REPO / "Dockerfile").read_text()
    assert steps[0] == ["FROM", "python:3.11-slim"]
    copied = {shlex.split(rest)[0] for op, rest in steps if op == "COPY"}
    assert {"pyproject.toml", "internlm_core", "services", "proto"} <= copied
    assert "python -m services.gen_protos --check" in text  # stubs in the image match its protos
    assert "INTERNLM_HOST=0.0.0.0" in text
    assert compose["x-app"]["build"] == "."


def test_redis_fsync_is_a_setting():
    cmd = redis_command(6379, "/data", fsync="always")
    assert cmd[cmd.index("--appendfsync") + 1] == "always"
    with pytest.raises(ValueError, match="appendfsync must be one of everysec, always, no"):
        redis_command(6379, "/data", fsync="sometimes")
