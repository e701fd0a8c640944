"""Settings: defaults, environment, TOML file, flags; a wrong setting stops with one line."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from dicom_node.config import Destination, SettingsError, load_settings
from tests.support.node import SPINENODE


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("SPINENODE_"):
            monkeypatch.delenv(name)


def test_defaults() -> None:
    settings = load_settings()
    assert (settings.ae_title, settings.port, settings.max_pdu) == ("SPINENODE", 11112, 131072)
    assert settings.allowed_calling_aes == [] and settings.destinations == []
    assert settings.embedded_broker
    assert settings.effective_database_url.startswith("sqlite:///")
    assert settings.effective_database_url.endswith("var/spinenode.sqlite")


def test_environment_then_toml_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "node.toml"
    toml.write_text('ae_title = "FROMTOML"\nport = 4000\nmax_pdu = 16384\n'
                    'destinations = ["PACS@10.1.2.3:104"]\n')
    monkeypatch.setenv("SPINENODE_PORT", "5000")
    monkeypatch.setenv("SPINENODE_ALLOWED_CALLING_AES", "CT1, MOD2")
    settings = load_settings(toml)
    assert settings.ae_title == "FROMTOML"  # from the file
    assert settings.port == 5000  # the environment beats the file
    assert settings.max_pdu == 16384
    assert settings.allowed_calling_aes == ["CT1", "MOD2"]
    assert settings.destinations == [Destination(ae_title="PACS", host="10.1.2.3", port=104)]
    assert load_settings(toml, port=6000).port == 6000  # a flag beats both


def test_destinations_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPINENODE_DESTINATIONS", "PACS@127.0.0.1:4242, VNA@vna.local:11112")
    settings = load_settings()
    assert [str(d) for d in settings.destinations] == ["PACS@127.0.0.1:4242",
                                                        "VNA@vna.local:11112"]


@pytest.mark.parametrize("name,value,needle", [
    ("SPINENODE_PORT", "70000", "SPINENODE_PORT"),
    ("SPINENODE_AE_TITLE", "A_TITLE_THAT_IS_TOO_LONG", "SPINENODE_AE_TITLE"),
    ("SPINENODE_DESTINATIONS", "PACS-without-host", "SPINENODE_DESTINATIONS"),
    ("SPINENODE_BROKER_URL", "kafka://x", "SPINENODE_BROKER_URL"),
    ("SPINENODE_DATABASE_URL", "mysql://x", "SPINENODE_DATABASE_URL"),
    ("SPINENODE_MAX_PDU", "lots", "SPINENODE_MAX_PDU"),
])
def test_bad_setting_names_itself(monkeypatch: pytest.MonkeyPatch, name: str, value: str,
                                  needle: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=needle):
        load_settings()


def test_serve_with_bad_setting_fails_with_one_line(tmp_path: Path) -> None:
    import os

    env = {**os.environ, "SPINENODE_PORT": "0x99", "SPINENODE_DATA_DIR": str(tmp_path)}
    result = subprocess.run([*SPINENODE, "serve"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith("spinenode: invalid setting SPINENODE_PORT")


def test_missing_config_file_is_one_line(tmp_path: Path) -> None:
    result = subprocess.run([*SPINENODE, "serve", "--config", str(tmp_path / "nope.toml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    missing = tmp_path / "nope.toml"
    assert result.stderr.strip() == f"spinenode: config file {missing} does not exist"


def test_train_commands_do_not_read_the_node_settings(tmp_path: Path) -> None:
    """A damaged SPINENODE_BUNDLE (a node setting) does not stop `spinenode train`."""
    import os

    env = {**os.environ, "SPINENODE_BUNDLE": str(tmp_path / "no-bundle"),
           "SPINENODE_PORT": "not-a-port"}
    result = subprocess.run([*SPINENODE, "train", "prepare", "--data", str(tmp_path / "none"),
                             "--out", str(tmp_path / "run"), "--config", "smoke"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "SPINENODE" not in result.stderr and "VinDr-SpineXR folder" in result.stderr


@pytest.mark.parametrize("url, shown", [
    ("postgresql+psycopg://u:Pw%40rd@db.example/spinenode",
     "postgresql+psycopg://u:***@db.example/spinenode"),
    ("postgresql://u:a%3Ab%2Fc%40d@db:5432/x", "postgresql://u:***@db:5432/x"),  # : / @ escaped
    ("amqp://guest:gu/est@rabbit:5672/vhost", "amqp://guest:***@rabbit:5672/vhost"),
    ("redis://:secret@redis:6379/0", "redis://:***@redis:6379/0"),  # password, no user
    ("postgresql://u:p@ss:w/rd@db/x", "postgresql://u:***@db/x"),  # unescaped: not a URL
    ("redis://redis:6379/0", "redis://redis:6379/0"),
    ("sqlite:////var/lib/spinenode/spinenode.sqlite",
     "sqlite:////var/lib/spinenode/spinenode.sqlite"),
    ("embedded", "embedded"),
])
def test_urls_are_printed_without_their_password(url: str, shown: str) -> None:
    from dicom_node.config import redact

    assert redact(url) == shown


@pytest.mark.parametrize("setting", ["database_url", "broker_url"])
def test_a_url_refused_by_the_settings_is_shown_without_its_password(setting: str) -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings(**{setting: "mysql://admin:topsecret@db.example/spine"})
    assert "topsecret" not in str(raised.value)
    assert "mysql://admin:***@db.example/spine" in str(raised.value)


def test_a_destination_url_may_not_carry_credentials() -> None:
    with pytest.raises(ValueError, match="no credentials") as raised:
        Destination.parse("https://pacs:s3cret@vna.example/dicom-web#sr")
    assert "s3cret" not in str(raised.value)
