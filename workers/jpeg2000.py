"""JPEG 2000 frames decoded on several threads: a pydicom decoding plugin.

pylibjpeg-openjpeg (pydicom's plugin for JPEG 2000) decodes a frame on one thread, and its
OpenJPEG ignores OPJ_NUM_THREADS: a 2500 x 2000 12-bit lossless frame took 0.56 s on one core of
a 2-core AMD EPYC while the other waited. imagecodecs wraps the same library (OpenJPEG 2.5) and
hands it a number of threads: 0.28 s on two, the same pixels (tests/workers/test_jpeg2000.py).
``install()`` puts this plugin ahead of the others for the JPEG 2000 transfer syntaxes; pydicom
falls back to them if it fails on a frame. The threads per frame are the ``j2k_threads`` decoding
option (``workers.imaging.decode``'s ``threads``).

pydicom calls ``is_available``, reads ``DECODER_DEPENDENCIES`` and calls ``decode_frame``; what
the frame's codestream says (precision, signedness) pydicom has put in the runner's options
already, and it applies the sign correction itself.
"""

from __future__ import annotations

from pydicom import uid
from pydicom.pixels.common import PhotometricInterpretation
from pydicom.pixels.decoders.base import DecodeRunner, get_decoder

PLUGIN = "imagecodecs-threads"
SYNTAXES = (uid.JPEG2000Lossless, uid.JPEG2000)
DECODER_DEPENDENCIES = dict.fromkeys(SYNTAXES, ("imagecodecs>=2024.1",))


def is_available(syntax: str) -> bool:
    if syntax not in SYNTAXES:
        return False
    try:
        import imagecodecs
    except ImportError:
        return False
    return bool(getattr(imagecodecs.JPEG2K, "available", False))


def decode_frame(src: bytes, runner: DecodeRunner) -> bytes:
    import imagecodecs

    frame = imagecodecs.jpeg2k_decode(src, numthreads=runner.get_option("j2k_threads", 1))
    # As pydicom's pylibjpeg plugin: OpenJPEG undoes the colour transform, and its samples are
    # 1, 2 or 4 bytes wide by the codestream's precision, whatever Bits Allocated says.
    if runner.photometric_interpretation in (PhotometricInterpretation.YBR_ICT,
                                             PhotometricInterpretation.YBR_RCT):
        runner.set_option("photometric_interpretation", PhotometricInterpretation.RGB)
    runner.set_option("bits_allocated", 8 * frame.dtype.itemsize)
    return frame.tobytes()


def install() -> None:
    """First among each JPEG 2000 syntax's plugins, in this process (decode processes too:
    ``workers.imaging`` installs it on import)."""
    for syntax in SYNTAXES:
        decoder = get_decoder(syntax)
        if PLUGIN in decoder.available_plugins or not is_available(syntax):
            continue
        others = dict(decoder._available)  # pydicom tries its plugins in this order
        decoder._available.clear()
        try:
            decoder.add_plugin(PLUGIN, (__name__, "decode_frame"))
        finally:  # pydicom's own stay, behind ours, whatever add_plugin did
            decoder._available.update(others)
