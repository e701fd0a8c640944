"""DICOM TLS (PS3.15 B.9, BCP 195): the SCP's server context and the sender's client context,
both TLS 1.2 or newer, from the node's certificate, key and CA bundle."""

from __future__ import annotations

import ssl

from dicom_node.config import Settings


def server_context(settings: Settings) -> ssl.SSLContext:
    """Shows our certificate; with tls_require_client_cert, a sender must show one that chains
    to tls_ca_file, or the handshake fails before any DICOM is spoken."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(settings.tls_certfile), str(settings.tls_keyfile))
    if settings.tls_ca_file is not None:
        context.load_verify_locations(cafile=str(settings.tls_ca_file))
    context.verify_mode = (ssl.CERT_REQUIRED if settings.tls_require_client_cert
                           else ssl.CERT_OPTIONAL if settings.tls_ca_file else ssl.CERT_NONE)
    return context


def client_context(settings: Settings) -> ssl.SSLContext:
    """Checks the peer's certificate against tls_ca_file (and its name against the host we
    connect to); shows ours when we have one."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                         cafile=str(settings.tls_ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.tls_certfile and settings.tls_keyfile:
        context.load_cert_chain(str(settings.tls_certfile), str(settings.tls_keyfile))
    return context
