import pytest

from streambridge.shared.errors import SettingsError
from streambridge.shared.settings import Settings, load_settings


def test_defaults_need_nothing_set() -> None:
    settings = load_settings({})
    assert settings.redis_url is None
    assert settings.llm_base_url is None
    assert settings.heartbeat_interval <= 15


def test_values_are_read_and_typed() -> None:
    settings = load_settings(
        {
            "STREAMBRIDGE_REDIS_URL": "redis://127.0.0.1:6379/3",
            "STREAMBRIDGE_LLM_BASE_URL": "http://localhost:11434/v1",
            "STREAMBRIDGE_WORKER_CONCURRENCY": "7",
            "STREAMBRIDGE_HEARTBEAT_INTERVAL": "0.5",
            "PATH": "/usr/bin",
        }
    )
    assert settings.redis_url == "redis://127.0.0.1:6379/3"
    assert settings.worker_concurrency == 7
    assert settings.heartbeat_interval == 0.5


def test_llm_api_key_falls_back_to_openai_api_key() -> None:
    assert load_settings({"OPENAI_API_KEY": "sk-x"}).llm_api_key == "sk-x"
    assert load_settings({"OPENAI_API_KEY": "sk-x", "STREAMBRIDGE_LLM_API_KEY": "own"}).llm_api_key == "own"


def test_file_quotas_are_read_and_visitors_default_to_less() -> None:
    defaults = load_settings({})
    assert defaults.visitor_file_bytes_per_user < defaults.file_bytes_per_user
    settings = load_settings(
        {"STREAMBRIDGE_FILE_BYTES_PER_USER": "5000000", "STREAMBRIDGE_VISITOR_FILE_BYTES_PER_USER": "1000"}
    )
    assert (settings.file_bytes_per_user, settings.visitor_file_bytes_per_user) == (5_000_000, 1000)


def test_cli_flags_override_the_environment() -> None:
    assert load_settings({"STREAMBRIDGE_WORKER_CONCURRENCY": "7"}, worker_concurrency=3).worker_concurrency == 3


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"STREAMBRIDGE_REDIS_URL": "http://localhost"}, "STREAMBRIDGE_REDIS_URL: malformed URL"),
        ({"STREAMBRIDGE_REDIS_URL": "redis://host:99999"}, "STREAMBRIDGE_REDIS_URL: malformed URL"),
        ({"STREAMBRIDGE_LLM_BASE_URL": "localhost:8000"}, "STREAMBRIDGE_LLM_BASE_URL: malformed URL"),
        ({"STREAMBRIDGE_PUBLIC_EDGE_URL": "ftp://x"}, "STREAMBRIDGE_PUBLIC_EDGE_URL: malformed URL"),
        ({"STREAMBRIDGE_WORKER_CONCURRENCY": "0"}, "STREAMBRIDGE_WORKER_CONCURRENCY: expected `int` >= 1"),
        ({"STREAMBRIDGE_WORKER_CONCURRENCY": "many"}, "STREAMBRIDGE_WORKER_CONCURRENCY: expected `int`"),
        ({"STREAMBRIDGE_HEARTBEAT_INTERVAL": "30"}, "STREAMBRIDGE_HEARTBEAT_INTERVAL: expected `float` <= 15"),
        ({"STREAMBRIDGE_FILE_BYTES_PER_USER": "0"}, "STREAMBRIDGE_FILE_BYTES_PER_USER: expected `int` >= 1"),
        (
            {"STREAMBRIDGE_VISITOR_FILE_BYTES_PER_USER": "50MB"},
            "STREAMBRIDGE_VISITOR_FILE_BYTES_PER_USER: expected `int`",
        ),
        ({"STREAMBRIDGE_LOG_LEVEL": "LOUD"}, "STREAMBRIDGE_LOG_LEVEL: must be one of"),
        ({"STREAMBRIDGE_LOG_FORMAT": "xml"}, "STREAMBRIDGE_LOG_FORMAT: must be one of auto, json, text"),
        ({"STREAMBRIDGE_LOG_CONTENT": "maybe"}, "STREAMBRIDGE_LOG_CONTENT: must be true or false"),
        ({"STREAMBRIDGE_ACCESS_LOG": "on"}, "STREAMBRIDGE_ACCESS_LOG: must be true or false"),
        ({"STREAMBRIDGE_REDIS_URLL": "redis://x"}, "STREAMBRIDGE_REDIS_URLL: unknown setting"),
    ],
)
def test_a_bad_setting_is_one_line_naming_the_variable(environ: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(environ)
    text = str(caught.value)
    assert text.startswith(message)
    assert "\n" not in text


@pytest.mark.parametrize(
    ("name", "url"),
    [
        ("STREAMBRIDGE_REDIS_URL", "redis://:hunter2pw@redis:6379/zero"),  # redis-py's own check
        ("STREAMBRIDGE_REDIS_URL", "redis://admin:hunter2pw@redis:port/0"),  # a port that is no number
        ("STREAMBRIDGE_REDIS_URL", "redis://:hunter2pw@/0"),  # no host
        ("STREAMBRIDGE_REDIS_URL", "redis://:hun/ter2pw@redis:6379/0"),  # a '/' in the password
        ("STREAMBRIDGE_REDIS_URL", "http://:hunter2pw@redis?password=hunter2pw"),  # the wrong scheme
        ("STREAMBRIDGE_LLM_BASE_URL", "ftp://user:hunter2pw@llm/v1?api-key=AZKEY"),
    ],
)
def test_a_malformed_url_is_named_without_its_password(name: str, url: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({name: url})
    text = str(caught.value)
    assert text.startswith(f"{name}: malformed URL")
    for secret in ("hunter2pw", "hun", "ter2pw", "AZKEY"):
        assert secret not in text, text


def test_settings_are_frozen() -> None:
    with pytest.raises(AttributeError):
        Settings().worker_concurrency = 2  # type: ignore[misc]


def test_cors_origins_are_an_allowlist_of_origins() -> None:
    settings = load_settings({"STREAMBRIDGE_CORS_ORIGINS": "https://a.example, http://localhost:3000/"})
    assert settings.allowed_origins == {"https://a.example", "http://localhost:3000"}
    assert load_settings({}).allowed_origins == frozenset()


@pytest.mark.parametrize("value", ["*", "https://a.example/app", "a.example", "ftp://a.example"])
def test_a_cors_origin_that_is_not_an_origin_is_refused(value: str) -> None:
    with pytest.raises(SettingsError, match="STREAMBRIDGE_CORS_ORIGINS"):
        load_settings({"STREAMBRIDGE_CORS_ORIGINS": value})
