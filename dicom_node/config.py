"""The node's one settings object.

Sources, strongest first: command-line flags (passed in as ``overrides``), environment
variables ``SPINENODE_*``, an optional TOML file (``--config``), then the defaults below.
Lists in the environment are comma separated (``SPINENODE_DESTINATIONS=PACS@10.0.0.5:104,...``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

# PS3.5 AE title: up to 16 characters of the default repertoire, no backslash or control codes.
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")
EMBEDDED_BROKER = "embedded"
DEFAULT_SPINE_BODY_PARTS = ("SPINE", "CSPINE", "TSPINE", "LSPINE", "SSPINE")
# SNOMED CT codes of the spine regions in CID 4031 (Common Anatomic Regions).
DEFAULT_SPINE_REGION_CODES = ("421060004", "122494005", "122495006", "122496007", "54735007")


def redact(url: str) -> str:
    """A URL fit to print anywhere (start-up line, errors, status, logs): its password is ***.
    SQLAlchemy's URL parser knows every form we take (database, redis://:secret@host, amqp://),
    and percent-escapes (Pw%40rd); a URL it cannot parse (an unescaped @ or : in the password)
    loses everything between the user name and the last @."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - any unparseable text: fall back to the plain rule
        return re.sub(r"(://[^:/@]*:).*@", r"\1***@", url)


class SettingsError(ValueError):
    """A setting that cannot be used; its message is one line naming the setting."""


def check_ae_title(value: str) -> str:
    value = value.strip()
    if not _AE_TITLE.match(value):
        raise ValueError(f"{value!r} is not a valid AE title (1-16 characters, no backslash)")
    return value


@dataclass(frozen=True)
class AllowedPeer:
    """An allow-list entry: a calling AE title (``*`` = any) from an address or network
    (``CT1@10.0.0.7``, ``PACS@10.0.0.0/24``, ``*@192.168.1.0/24``; a bare ``CT1`` = from
    anywhere). AE titles alone are what the sender claims; the address is what it has."""

    ae_title: str | None  # None: any
    network: IPv4Network | IPv6Network | None  # None: any address

    @classmethod
    def parse(cls, text: str) -> AllowedPeer:
        title, _, where = text.strip().partition("@")
        ae_title = None if title == "*" else check_ae_title(title)
        try:
            network = ip_network(where.strip(), strict=False) if where else None
        except ValueError:
            raise ValueError(f"{text!r}: {where!r} is not an IP address or network") from None
        if ae_title is None and network is None:
            raise ValueError(f"{text!r} allows everyone; leave the list empty for that")
        return cls(ae_title, network)

    def admits(self, calling_ae: str, address: str) -> bool:
        if self.ae_title is not None and calling_ae != self.ae_title:
            return False
        try:
            return self.network is None or ip_address(address) in self.network
        except ValueError:  # not an IP address: a network entry cannot admit it
            return False

    def __str__(self) -> str:
        return f"{self.ae_title or '*'}{f'@{self.network}' if self.network else ''}"


class ResultKind(StrEnum):
    """The objects we send back, in the order they are made."""

    SR = "sr"  # TID 1500 Structured Report
    SC = "sc"  # Secondary Capture overlay, uncompressed
    SC_JPEG = "sc-jpeg"  # the same, JPEG baseline
    GSPS = "gsps"  # Grayscale Softcopy Presentation State on the source image


RESULT_KINDS = tuple(ResultKind)
OVERLAY_KINDS = (ResultKind.SC, ResultKind.SC_JPEG)  # the result as a picture
DEFAULT_RESULT_KINDS = (ResultKind.SR, ResultKind.SC)  # GSPS only where a destination asks


def _parse_kinds(text: str | None) -> tuple[ResultKind, ...]:
    if not text:
        return DEFAULT_RESULT_KINDS
    names = [kind.strip().lower() for kind in text.split("+") if kind.strip()]
    unknown = [name for name in names if name not in RESULT_KINDS]
    if unknown or not names:
        raise ValueError(f"unknown result objects {unknown}; use {'+'.join(RESULT_KINDS)}")
    kinds = tuple(ResultKind(name) for name in names)
    if ResultKind.SC in kinds and ResultKind.SC_JPEG in kinds:
        raise ValueError("choose sc or sc-jpeg, not both")
    return kinds


class Destination(BaseModel):
    """Where results go: a DICOM peer, ``AE@host:port[/sr+sc-jpeg+gsps][;tls]`` (C-STORE, over
    DICOM TLS with ``;tls``), or a DICOMweb server, ``https://host/dicom-web[#sr+sc]``
    (STOW-RS).

    The objects are sr, sc (uncompressed), sc-jpeg (JPEG baseline) and gsps; default sr+sc.
    """

    ae_title: str = ""
    host: str = ""
    port: int = 0
    url: str = ""  # a DICOMweb server's base URL (then no AE, host, port)
    kinds: tuple[ResultKind, ...] = DEFAULT_RESULT_KINDS
    tls: bool = False  # DICOM TLS to the peer (its certificate checked against tls_ca_file)

    @classmethod
    def parse(cls, text: str) -> Destination:
        web = re.fullmatch(r"\s*(https?://[^\s#,]+?)/?(?:#([a-z+-]+))?\s*", text)
        if web:
            if "@" in web.group(1).split("/", 3)[2]:  # user:password@host
                raise ValueError(f"{redact(web.group(1))}: no credentials in a destination's "
                                 "URL (it is stored and logged); put them in "
                                 "SPINENODE_DICOMWEB_SECRETS_DIR")
            if len(web.group(0).strip()) > 128:  # the outbox keeps it in 128 characters
                raise ValueError(f"{text!r}: a URL of at most 128 characters")
            return cls(url=web.group(1), kinds=_parse_kinds(web.group(2)))
        match = re.fullmatch(r"\s*([^@]+)@([^:@/\s]+):(\d+)(?:/([a-z+-]+))?(;tls)?\s*", text)
        if not match:
            raise ValueError(f"{text!r} is not AE@host:port[/sr+sc+gsps][;tls] or "
                             "http(s)://host/dicom-web[#sr+sc+gsps]")
        port = int(match.group(3))
        if not 0 < port < 65536:
            raise ValueError(f"{text!r}: port out of range")
        return cls(ae_title=check_ae_title(match.group(1)), host=match.group(2), port=port,
                   kinds=_parse_kinds(match.group(4)), tls=bool(match.group(5)))

    @property
    def address(self) -> str:
        return self.url or f"{self.ae_title}@{self.host}:{self.port}"

    def __str__(self) -> str:
        kinds = "" if self.kinds == DEFAULT_RESULT_KINDS else (
            ("#" if self.url else "/") + "+".join(self.kinds))
        return self.address + kinds + (";tls" if self.tls else "")


def _split_list(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


CommaList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SPINENODE_", extra="forbid")

    ae_title: str = "SPINENODE"
    bind_address: str = "0.0.0.0"
    port: int = Field(11112, gt=0, lt=65536)
    # Who may associate: AE, AE@address, AE@network/prefix or *@network (empty: anyone).
    allowed_calling_aes: CommaList = Field(default_factory=list)
    require_called_ae: bool = True
    max_pdu: int = Field(131072, ge=0)
    max_associations: int = Field(16, ge=1)
    # Processes that take associations, all on the same port(s) (SO_REUSEPORT: the kernel
    # spreads new connections over them). One Python process receives at most a few hundred
    # MB/s whatever the number of senders; several senders at once want about one per core.
    # Each takes up to max_associations; metrics add up in the node's /metrics.
    intake_processes: int = Field(1, ge=1, le=64)
    # DICOM TLS: a second listener on tls_port (0: none), or only it (tls_only). Our certificate
    # and key (also shown to peers we send to over TLS), the CA bundle that peers' certificates
    # must chain to, and whether a sender must show one. TLS 1.2 at least.
    tls_port: int = Field(0, ge=0, lt=65536)
    tls_only: bool = False
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None
    tls_ca_file: Path | None = None
    tls_require_client_cert: bool = True
    # An association request must complete (ACSE), a DIMSE answer arrive, and a connection
    # carry something within these, or the node drops it.
    acse_timeout_seconds: float = Field(30.0, gt=0)
    dimse_timeout_seconds: float = Field(30.0, gt=0)
    network_timeout_seconds: float = Field(60.0, gt=0)
    data_dir: Path = Path("./var")
    database_url: str = ""
    broker_url: str = EMBEDDED_BROKER
    bundle: Path | None = None
    # When set, a bundle is served only with a valid Ed25519 signature of its manifest by the
    # key (spinenode bundle sign); the detector's checkpoint is a pickle, i.e. code.
    bundle_public_key: Path | None = None
    destinations: Annotated[list[Destination], NoDecode] = Field(default_factory=list)
    # Results for images from a calling AE listed here also go back to it, e.g.
    # "CT1@10.0.0.7:104/sr+sc": the AE title is the calling AE it answers.
    reply_to_calling_ae: Annotated[list[Destination], NoDecode] = Field(default_factory=list)
    # "study": one SR per study, written once the study has been quiet for study_stable_seconds
    # (a later image makes a new version), and the SC/GSPS of its images in one series per kind;
    # "image": an SR, SC and GSPS series for each image as soon as it is analysed.
    result_scope: Literal["study", "image"] = "study"
    # Credentials for DICOMweb destinations: a file per host (named host, or host_port) holding
    # "Bearer <token>" or "Basic <user>:<password>", e.g. Docker secrets. Never logged.
    dicomweb_secrets_dir: Path | None = None
    study_stable_seconds: float = Field(30.0, gt=0)
    # Delivery: exponential backoff from delivery_retry_seconds, at most max_delivery_attempts.
    delivery_retry_seconds: float = Field(30.0, gt=0)
    delivery_max_backoff_seconds: float = Field(3600.0, gt=0)
    max_delivery_attempts: int = Field(8, ge=1)

    # Routing: which received images are analysed.
    route_modalities: CommaList = Field(default_factory=lambda: ["CR", "DX"])
    route_body_parts: CommaList = Field(default_factory=lambda: list(DEFAULT_SPINE_BODY_PARTS))
    route_region_codes: CommaList = Field(
        default_factory=lambda: list(DEFAULT_SPINE_REGION_CODES)
    )

    # Objects the routing rules do not select are recorded (patient, study, series, instance,
    # reason) and acknowledged; their files are kept only with keep_skipped.
    keep_skipped: bool = False

    # Retention (unset: keep forever). The spool keeps a finished image's pixel data this long
    # (and at most this much in all, oldest purged first); its header stays, as does its row.
    # Overlays (SC) we made go this long after every delivery of theirs succeeded. Nothing
    # whose analysis or delivery is pending is ever touched. The reconciler purges each round.
    spool_retention_days: float | None = Field(None, gt=0)
    spool_retention_max_mb: float | None = Field(None, gt=0)
    outputs_retention_days: float | None = Field(None, gt=0)
    outputs_retention_max_mb: float | None = Field(None, gt=0)

    # Below this much free space in the spool, C-STORE answers 0xA700 instead of filling the disk.
    min_free_disk_mb: int = Field(256, ge=0)
    # Largest image the decoder will allocate (Rows x Columns x frames x samples).
    max_pixels: int = Field(64_000_000, gt=0)

    # Work left half way: a claimed task whose lease ran out is handed out again. A working
    # worker renews its lease every third of it, so a dead worker's image waits about this long.
    task_lease_seconds: int = Field(60, ge=3)
    # The longest one task (a batch, or a model load plus an image) may run before it is killed.
    task_time_limit_seconds: int = Field(900, ge=10)
    max_attempts: int = Field(3, ge=1)
    reconcile_interval_seconds: float = Field(60.0, gt=0)
    # A received/queued row younger than this is still in flight, not lost.
    reconcile_grace_seconds: float = Field(30.0, ge=0)
    # A file in spool/incoming untouched this long is what an aborted association left behind.
    incoming_stale_seconds: float = Field(600.0, gt=0)
    worker_concurrency: int = Field(1, ge=1)

    # Inference: "auto" takes CUDA when present; torch_threads 0 = torch's default (all cores).
    device: str = "auto"
    torch_threads: int = Field(0, ge=0)
    # "auto": half precision on CUDA; on a CPU bfloat16 where the CPU has it natively, else int8
    # members (x86-64), else float32; a reduced precision only where the bundle's manifest lists
    # it as validated, per component. float32 turns them all off.
    precision: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # CPU workers: compile the models with PyTorch's inductor at load (workers/compiled.py):
    # faster inference for minutes of compiling at the first start, and g++ on the machine.
    compile_models: bool = False
    # Batching: a task also claims up to batch_size - 1 other queued instances, waiting at most
    # batch_wait_ms for them, and decodes them in decode_workers processes at once. Worth it on
    # a GPU (e.g. 8); 1 = one image per task.
    batch_size: int = Field(1, ge=1, le=256)
    batch_wait_ms: int = Field(50, ge=0)
    decode_workers: int = Field(2, ge=1)
    # VinDr-SpineXR's combination rule (off when unset): on an image the ensemble calls normal,
    # keep only boxes scoring at least this (VinDr used 0.5).
    normal_min_box_score: float | None = Field(None, ge=0, le=1)

    # The admins' HTTP side (results API, dashboard page, /health, /metrics); 0 turns it off.
    # Local only by default: put it behind TLS (http_ssl_* or a reverse proxy) to open it up.
    http_port: int = Field(8080, ge=0, lt=65536)
    http_bind_address: str = "127.0.0.1"
    http_ssl_certfile: Path | None = None
    http_ssl_keyfile: Path | None = None
    # Workers write a heartbeat this often; /health/ready wants one younger than the max age.
    worker_heartbeat_seconds: float = Field(10.0, gt=0)
    worker_heartbeat_max_age_seconds: float = Field(60.0, gt=0)

    log_level: str = "INFO"
    # "text" for people, "json" (one object a line, ids as fields) for a log pipeline.
    log_format: Literal["text", "json"] = "text"

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        return check_ae_title(value)

    @field_validator("allowed_calling_aes", mode="before")
    @classmethod
    def _calling_aes(cls, value: Any) -> Any:
        return [str(AllowedPeer.parse(item)) for item in _split_list(value)]

    @field_validator("route_modalities", "route_body_parts", mode="before")
    @classmethod
    def _upper_list(cls, value: Any) -> Any:
        return [item.upper() for item in _split_list(value)]

    @field_validator("route_region_codes", mode="before")
    @classmethod
    def _plain_list(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("destinations", "reply_to_calling_ae", mode="before")
    @classmethod
    def _destinations(cls, value: Any, info: ValidationInfo) -> Any:
        parsed = [Destination.parse(item) if isinstance(item, str) else item
                  for item in _split_list(value)]
        if info.field_name == "reply_to_calling_ae" and any(d.url for d in parsed):
            raise ValueError("a reply goes to a calling AE: use AE@host:port, not a URL")
        return parsed

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError("use auto, cpu, cuda or cuda:N")
        return value

    @field_validator("bundle")
    @classmethod
    def _bundle(cls, value: Path | None) -> Path | None:
        if value is not None and not (value / "manifest.json").is_file():
            raise ValueError(f"{value} is not a model bundle (no manifest.json)")
        return value

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        value = value.upper()
        if value not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
        return value

    @field_validator("broker_url")
    @classmethod
    def _broker(cls, value: str) -> str:
        if value != EMBEDDED_BROKER and not re.match(r"^(redis|rediss|amqp|amqps)://", value):
            raise ValueError(f"{redact(value)!r}: use 'embedded', a redis:// or an amqp:// "
                             "(RabbitMQ) URL")
        return value

    @field_validator("database_url")
    @classmethod
    def _database(cls, value: str) -> str:
        if value and not re.match(r"^(sqlite|postgresql)(\+\w+)?://", value):
            raise ValueError(f"{redact(value)!r}: use a sqlite:// or postgresql:// URL")
        return value

    # -- derived paths and URLs ---------------------------------------------------------------

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def incoming_dir(self) -> Path:
        """Where a C-STORE streams to; on the spool's file system so the final move is a rename."""
        return self.spool_dir / "incoming"

    @property
    def queue_dir(self) -> Path:
        return self.data_dir / "queue"

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'spinenode.sqlite').resolve()}"

    @property
    def outage_patience_seconds(self) -> float:
        """How long a worker holding finished work waits for the database to come back before
        it gives the work up (half the task's time limit: it is killed at the limit)."""
        return self.task_time_limit_seconds / 2

    @model_validator(mode="after")
    def _tls(self) -> Settings:
        if self.tls_only and not self.tls_port:
            raise ValueError("tls_only needs a tls_port")
        if self.tls_port and not (self.tls_certfile and self.tls_keyfile):
            raise ValueError("a tls_port needs tls_certfile and tls_keyfile")
        if self.tls_port and self.tls_require_client_cert and not self.tls_ca_file:
            raise ValueError("tls_require_client_cert needs tls_ca_file (the CA that client "
                             "certificates chain to)")
        if any(d.tls for d in self.destinations + self.reply_to_calling_ae) \
                and not self.tls_ca_file:
            raise ValueError("a ;tls destination needs tls_ca_file (to check its certificate)")
        for name in ("tls_certfile", "tls_keyfile", "tls_ca_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name} {path} is not a file")
        return self

    @property
    def allowed_peers(self) -> list[AllowedPeer]:
        return [AllowedPeer.parse(item) for item in self.allowed_calling_aes]

    @property
    def embedded_broker(self) -> bool:
        return self.broker_url == EMBEDDED_BROKER

    def make_dirs(self) -> None:
        for path in (self.data_dir, self.spool_dir, self.incoming_dir, self.queue_dir):
            path.mkdir(parents=True, exist_ok=True)

    def as_environment(self) -> dict[str, str]:
        """These settings as SPINENODE_* variables, for a child process (the embedded worker)."""
        env: dict[str, str] = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            if name in ("destinations", "reply_to_calling_ae"):
                text = ",".join(str(d) for d in getattr(self, name))
            elif isinstance(value, list):
                text = ",".join(str(item) for item in value)
            elif isinstance(value, bool):
                text = "true" if value else "false"
            else:
                text = str(value)
            env[f"SPINENODE_{name.upper()}"] = text
        env["SPINENODE_DATA_DIR"] = str(self.data_dir.resolve())
        return env

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file comes from model_config["toml_file"], set by load_settings.
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings, or raise SettingsError with one line that names the bad setting."""
    overrides = {key: value for key, value in overrides.items() if value is not None}
    if config_file is not None and not config_file.is_file():
        raise SettingsError(f"config file {config_file} does not exist")
    settings_cls: type[Settings] = Settings
    if config_file is not None:
        config = SettingsConfigDict(**{**Settings.model_config, "toml_file": config_file})
        settings_cls = type("Settings", (Settings,), {"model_config": config})
    try:
        return settings_cls(**overrides)
    except ValidationError as error:
        first = error.errors()[0]
        message = first["msg"].removeprefix("Value error, ")
        if not first["loc"]:  # a rule between settings: its message names them
            raise SettingsError(f"invalid settings: {message}") from None
        env_name = f"SPINENODE_{str(first['loc'][0]).upper()}"
        raise SettingsError(f"invalid setting {env_name}: {message}") from None
    except Exception as error:  # a TOML syntax error, say
        raise SettingsError(f"cannot read settings: {error}") from None
