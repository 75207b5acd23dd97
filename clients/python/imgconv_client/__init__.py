"""Client of the imgconv agent's control API, and a Nova image backend that
uses it.
"""

from imgconv_client import errors
from imgconv_client.client import Client, DEFAULT_SOCKET, disk_name

__all__ = ['Client', 'DEFAULT_SOCKET', 'disk_name', 'errors']
