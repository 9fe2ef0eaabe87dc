"""cogvx: fine-tune the CogVideoX family of video diffusion models into custom video generators."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cogvx")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
