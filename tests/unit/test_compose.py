"""compose.yaml and the Dockerfile run real streambridge commands with real settings."""

from __future__ import annotations

import importlib
import ipaddress
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
NGINX_CONF = ROOT / "deploy" / "nginx.conf"

SUBCOMMANDS = {"up", "api", "edge", "worker", "fake-llm"}
SERVERS = {"up", "api", "edge", "fake-llm"}
#: services that run someone else's image; every other one runs streambridge's
THIRD_PARTY = {"redis", "nginx", "prometheus", "grafana"}
EDGES = ("edge-a", "edge-b")


def load_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def services() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = load_compose()["services"]
    return found


def project_services() -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in services().items() if name not in THIRD_PARTY}


def command_of(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def environment_names(service: dict[str, Any]) -> set[str]:
    environment = service.get("environment") or {}
    if isinstance(environment, dict):
        return set(environment)
    return {entry.split("=", 1)[0] for entry in environment}


def settings_class() -> Any:
    try:
        settings = importlib.import_module("streambridge.shared.settings")
    except ModuleNotFoundError:  # the project is not installed: import it from the checkout
        sys.path.insert(0, str(ROOT))
        settings = importlib.import_module("streambridge.shared.settings")
    return settings.Settings


def settings_env_names() -> set[str]:
    return {"STREAMBRIDGE_" + field.upper() for field in settings_class().__struct_fields__}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, arguments = line.partition(" ")
            pairs.append((instruction.upper(), arguments.strip()))
    return pairs


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (instruction, _) in enumerate(instructions) if instruction == "FROM"]
    assert starts, "the Dockerfile has no FROM"
    return instructions[starts[-1] :]


def working_compose_cli() -> list[str] | None:
    """`docker compose` or `docker-compose`, whichever is installed and answers `version`."""
    candidates = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        candidates.append(["docker-compose"])
    for cli in candidates:
        try:
            probe = subprocess.run([*cli, "version"], capture_output=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return cli
    return None


def test_compose_file_has_no_obsolete_version_key() -> None:
    assert "version" not in load_compose()


def test_every_project_service_builds_the_project_image() -> None:
    assert set(project_services()) >= {"api", *EDGES, "worker", "fake-llm"}
    for name, service in project_services().items():
        build = service.get("build")
        context = build.get("context", ".") if isinstance(build, dict) else build
        assert context is not None, f"{name} does not build the project"
        assert (COMPOSE.parent / context).resolve() == ROOT, f"{name} builds from {context!r}"
        dockerfile = build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile"
        assert (ROOT / dockerfile).resolve() == DOCKERFILE


def test_every_project_service_runs_a_streambridge_subcommand() -> None:
    for name, service in project_services().items():
        assert "entrypoint" not in service, f"{name} overrides the image's entrypoint"
        command = command_of(service)
        assert command, f"{name} has no command"
        assert command[0] in SUBCOMMANDS, f"{name} runs {command[0]!r}, not a streambridge subcommand"


def test_dockerfile_entrypoint_is_the_streambridge_cli() -> None:
    stage = final_stage(dockerfile_instructions())
    entrypoints = [arguments for instruction, arguments in stage if instruction == "ENTRYPOINT"]
    assert entrypoints, "the final stage has no ENTRYPOINT"
    assert json.loads(entrypoints[-1]) == ["streambridge"]


def test_dockerfile_runs_as_a_non_root_user() -> None:
    users = [arguments for instruction, arguments in final_stage(dockerfile_instructions()) if instruction == "USER"]
    assert users, "the final stage has no USER"
    user = users[-1].split(":", 1)[0]
    assert user not in {"root", "0"}


def test_servers_listen_on_all_interfaces_and_publish_their_port() -> None:
    for name, service in project_services().items():
        command = command_of(service)
        if command[0] not in SERVERS:
            continue
        assert "--host" in command, f"{name} would listen on 127.0.0.1 only"
        assert command[command.index("--host") + 1] == "0.0.0.0"
        port = command[command.index("--port") + 1]
        published = [str(mapping).rsplit(":", 1)[-1] for mapping in service.get("ports", [])]
        assert not published or port in published, f"{name} listens on {port} but publishes {published}"


def test_redis_persists_with_appendonly_everysec() -> None:
    command = command_of(services()["redis"])
    assert command[0] == "redis-server"
    options = dict(zip(command[1::2], command[2::2], strict=False))
    assert options.get("--appendonly") == "yes"
    assert options.get("--appendfsync") == "everysec"
    assert any(str(volume).endswith(":/data") for volume in services()["redis"].get("volumes", []))


def test_every_streambridge_variable_is_a_real_setting() -> None:
    known = settings_env_names()
    for name, service in services().items():
        unknown = {var for var in environment_names(service) if var.startswith("STREAMBRIDGE_")} - known
        assert not unknown, f"{name} sets {sorted(unknown)}, which streambridge rejects at start"


def test_project_services_reach_redis_inside_the_compose_network() -> None:
    for name in ("api", *EDGES, "worker"):
        service = services()[name]
        assert service["environment"]["STREAMBRIDGE_REDIS_URL"] == "redis://redis:6379/0"
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"


def test_simulated_llm_is_opt_in_through_the_fake_profile() -> None:
    assert services()["fake-llm"]["profiles"] == ["fake"]
    assert "fake-llm:8100" in services()["worker"]["environment"]["STREAMBRIDGE_LLM_BASE_URL"]


def nginx_conf() -> str:
    return NGINX_CONF.read_text(encoding="utf-8")


def nginx_upstreams() -> dict[str, list[str]]:
    """Each ``upstream NAME { server HOST:PORT; … }`` of deploy/nginx.conf: NAME → its servers."""
    blocks = re.findall(r"upstream\s+(\w+)\s*\{(.*?)\}", nginx_conf(), flags=re.DOTALL)
    return {name: re.findall(r"^\s*server\s+(\S+?)(?:\s+[^;]*)?;", body, flags=re.MULTILINE) for name, body in blocks}


def nginx_upstream_bodies() -> dict[str, str]:
    return dict(re.findall(r"upstream\s+(\w+)\s*\{(.*?)\}", nginx_conf(), flags=re.DOTALL))


def nginx_seconds(directive: str) -> list[float]:
    units = {"": 1, "s": 1, "m": 60, "h": 3600}
    found = re.findall(rf"^\s*{directive}\s+(\d+)([smh]?)\s*;", nginx_conf(), flags=re.MULTILINE)
    return [int(number) * units[unit] for number, unit in found]


def port_of(name: str) -> str:
    command = command_of(services()[name])
    return command[command.index("--port") + 1]


def test_third_party_images_are_pinned() -> None:
    for name in THIRD_PARTY:
        image = services()[name]["image"]
        assert ":" in image, f"{name} runs {image!r}, which moves under you"
        assert not image.endswith(":latest"), f"{name} runs {image!r}, which moves under you"


def test_nginx_is_the_one_public_door_to_the_api_and_two_edges() -> None:
    nginx = services()["nginx"]
    assert "./deploy/nginx.conf:/etc/nginx/nginx.conf:ro" in nginx["volumes"]
    for name in ("api", *EDGES):
        assert not services()[name].get("ports"), f"{name} is published past nginx"
        assert nginx["depends_on"][name]["condition"] == "service_healthy"
    [listen] = re.findall(r"^\s*listen\s+(\d+)\s*;", nginx_conf(), flags=re.MULTILINE)
    assert nginx["ports"] == [f"8000:{listen}"]
    for name in ("api", *EDGES):
        environment = services()[name]["environment"]
        # passed through, with no default: unset, stream_url is built from the Host nginx passes (the
        # address the client used, whatever it is) and the page's CSP allows its own origin
        assert "STREAMBRIDGE_PUBLIC_EDGE_URL" in environment
        assert environment["STREAMBRIDGE_PUBLIC_EDGE_URL"] is None
    assert re.search(r"^\s*proxy_set_header\s+Host\s+\$http_host;", nginx_conf(), flags=re.MULTILINE)


def test_api_and_edges_trust_nginx_alone_to_name_the_client() -> None:
    # a fixed address on a fixed subnet, so that no other container on the network is a "proxy"
    [subnet] = [entry["subnet"] for entry in load_compose()["networks"]["default"]["ipam"]["config"]]
    nginx_address = services()["nginx"]["networks"]["default"]["ipv4_address"]
    assert ipaddress.ip_address(nginx_address) in ipaddress.ip_network(subnet)
    for name in ("api", *EDGES):
        trusted = services()[name]["environment"]["STREAMBRIDGE_TRUSTED_PROXIES"]
        networks = settings_class()(trusted_proxies=trusted).trusted_networks
        assert [str(network) for network in networks] == [f"{nginx_address}/32"], name


def test_nginx_is_the_outermost_hop_and_names_the_client_itself() -> None:
    # $proxy_add_x_forwarded_for would keep what the client sent, and the client would choose its address
    headers = dict(re.findall(r"^\s*proxy_set_header\s+(\S+)\s+(.+?);", nginx_conf(), flags=re.MULTILINE))
    assert headers["X-Forwarded-For"] == "$remote_addr"
    assert headers["X-Forwarded-Proto"] == "$scheme"
    assert "$proxy_add_x_forwarded_for" not in re.sub(r"#.*", "", nginx_conf())


def test_nginx_closes_idle_upstream_connections_before_streambridge_does() -> None:
    # aiohttp closes a connection idle for header_timeout; nginx must drop it first, or a POST sent on it fails
    header_timeout = settings_class()().header_timeout
    for name, body in nginx_upstream_bodies().items():
        [timeout] = re.findall(r"^\s*keepalive_timeout\s+(\d+)s\s*;", body, flags=re.MULTILINE) or [None]
        assert timeout is not None, f"upstream {name} keeps idle connections 60 s (nginx's default)"
        assert int(timeout) < header_timeout, f"upstream {name}: {timeout} s is not below {header_timeout} s"
        assert re.search(r"^\s*keepalive\s+\d+\s*;", body, flags=re.MULTILINE), name


def test_nginx_finds_recreated_containers_by_their_names_again() -> None:
    assert re.search(r"^\s*resolver\s+127\.0\.0\.11\s+valid=\d+s\b", nginx_conf(), flags=re.MULTILINE)
    for name, body in nginx_upstream_bodies().items():
        assert re.search(r"^\s*zone\s+\w+\s+\d+k\s*;", body, flags=re.MULTILINE), name
        servers = re.findall(r"^\s*server\s+[^;]*;", body, flags=re.MULTILINE)
        assert servers, name
        assert all(server.split()[-1] == "resolve;" for server in servers), name
    # `resolve` in an upstream is in open-source nginx from 1.27.3 on
    version = re.fullmatch(r"nginx:(\d+)\.(\d+)\.(\d+)-alpine", services()["nginx"]["image"])
    assert version is not None
    assert tuple(int(part) for part in version.groups()) >= (1, 27, 3)


def test_readme_names_the_nginx_image_compose_runs() -> None:
    assert f"`{services()['nginx']['image']}`" in (ROOT / "README.md").read_text(encoding="utf-8")


def nginx_body_limits() -> tuple[list[str], dict[str, str]]:
    """client_max_body_size at server level, and in each location that sets its own: location → value."""
    conf = re.sub(r"#.*", "", nginx_conf())
    locations = {
        match[1].strip(): match[2] for match in re.finditer(r"location\s+([^{]+)\{([^}]*)\}", conf, flags=re.DOTALL)
    }
    outside = re.sub(r"location\s+[^{]+\{[^}]*\}", "", conf, flags=re.DOTALL)
    limit = r"^\s*client_max_body_size\s+(\S+)\s*;"
    per_location = {
        where: found[0] for where, body in locations.items() if (found := re.findall(limit, body, flags=re.MULTILINE))
    }
    return re.findall(limit, outside, flags=re.MULTILINE), per_location


def test_nginx_takes_large_bodies_on_uploads_only_and_streams_them() -> None:
    server_level, per_location = nginx_body_limits()
    sizes = {"k": 1024, "m": 1024 * 1024}
    [general] = server_level
    general_bytes = int(general[:-1]) * sizes[general[-1]]
    max_body = settings_class()().max_body_bytes
    assert max_body < general_bytes <= 4 * max_body, f"client_max_body_size {general} for JSON of {max_body} bytes"
    assert per_location == {"= /v1/files": "256m"}
    files = re.search(r"location = /v1/files \{(.*?)\}", nginx_conf(), flags=re.DOTALL)
    assert files is not None
    assert re.search(r"^\s*proxy_request_buffering\s+off;", files[1], flags=re.MULTILINE)
    assert "proxy_pass http://streambridge_api;" in files[1]


def test_a_503_from_streambridge_does_not_count_as_a_failed_edge() -> None:
    # it is streambridge's own answer (Redis unreachable); counting it takes a healthy edge out for 10 s
    for line in re.findall(r"^\s*proxy_next_upstream\s+([^;]*);", nginx_conf(), flags=re.MULTILINE):
        assert "http_503" not in line.split()


def test_every_bind_mount_source_exists() -> None:
    for name, service in services().items():
        for volume in service.get("volumes", []):
            source = str(volume).split(":", 1)[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which is not in the repo"


def test_the_workers_metrics_are_reachable_on_the_compose_network() -> None:
    assert services()["worker"]["environment"]["STREAMBRIDGE_WORKER_METRICS_HOST"] == "0.0.0.0"


def test_every_process_that_admits_chats_knows_the_same_default_model() -> None:
    # the edges admit OpenAI's chats: without the setting they would pick another model than the api
    models = {
        name: services()[name]["environment"].get("STREAMBRIDGE_LLM_MODEL", "absent")
        for name in ("api", *EDGES, "worker")
    }
    assert len(set(models.values())) == 1, models
    assert models["api"] != "absent"


def test_nginx_upstreams_are_the_compose_services_on_their_ports() -> None:
    upstreams = nginx_upstreams()
    assert upstreams["streambridge_api"] == [f"api:{port_of('api')}"]
    assert upstreams["streambridge_edges"] == [f"{name}:{port_of(name)}" for name in EDGES]
    assert [command_of(services()[name])[0] for name in EDGES] == ["edge", "edge"]


def test_nginx_passes_event_streams_unbuffered_with_their_position_to_the_edges() -> None:
    conf = nginx_conf()
    assert re.search(r"^\s*proxy_buffering\s+off;", conf, flags=re.MULTILINE)
    assert not re.search(r"^\s*proxy_buffering\s+on;", conf, flags=re.MULTILINE)
    assert "proxy_ignore_headers" not in conf  # X-Accel-Buffering from the edge is honoured
    assert not re.search(r"^\s*gzip\s+on;", conf, flags=re.MULTILINE)
    assert re.findall(r"^\s*proxy_http_version\s+(\S+);", conf, flags=re.MULTILINE) == ["1.1"]
    assert re.search(r"^\s*proxy_set_header\s+Last-Event-ID\s+\$http_last_event_id;", conf, flags=re.MULTILINE)
    events = re.search(r"location ~ \^/v1/chats/\[\^/\]\+/events\$ \{(.*?)\}", conf, flags=re.DOTALL)
    assert events is not None
    assert "proxy_pass http://streambridge_edges;" in events[1]


def test_nginx_read_timeouts_outlast_the_edges_heartbeat() -> None:
    longest_heartbeat = settings_class()().heartbeat_interval  # the default, 15 s, is also its upper bound
    timeouts = nginx_seconds("proxy_read_timeout")
    assert timeouts
    assert min(timeouts) >= 4 * longest_heartbeat, "a stream quiet for a few pings' time would be cut"


def test_observability_is_opt_in_through_the_observe_profile() -> None:
    prometheus, grafana = services()["prometheus"], services()["grafana"]
    assert prometheus["profiles"] == grafana["profiles"] == ["observe"]
    assert any(v.startswith("./deploy/prometheus.yml:") for v in prometheus["volumes"])
    mounted = {v.split(":")[0] for v in grafana["volumes"]}
    assert {"./deploy/grafana/provisioning", "./deploy/grafana/dashboards"} <= mounted


def test_every_long_running_server_has_a_healthcheck() -> None:
    for name in ("redis", "api", *EDGES, "nginx"):
        test = services()[name]["healthcheck"]["test"]
        assert test[0] == "CMD", name
        assert len(test) > 1, name


def test_no_service_runs_as_root_by_override() -> None:
    for name, service in services().items():
        assert str(service.get("user", "")).split(":")[0] not in {"root", "0"}, name


def test_docker_compose_accepts_the_file() -> None:
    cli = working_compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed and working")
    result = subprocess.run(
        [*cli, "-f", str(COMPOSE), "--profile", "fake", "--profile", "observe", "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_no_test_knob_is_named_like_a_setting() -> None:
    # every streambridge command refuses an unknown STREAMBRIDGE_* variable: a test's knob exported in
    # a shell under that prefix would stop them all
    known = settings_env_names()
    read = {
        name
        for path in (ROOT / "tests").rglob("*.py")
        for name in re.findall(r"environ\.get\(\s*\"(STREAMBRIDGE_\w+)\"", path.read_text(encoding="utf-8"))
    }
    assert not read - known, f"tests read {sorted(read - known)}: name them SB_TEST_…"
