"""Exceptions of the imgconv client: one class per error type the control API
documents.

The agent answers every error as ``{"error": {"code": N, "type": "...",
"message": "..."}}``; the client raises the class ``BY_TYPE[type]``. The
classes form a small hierarchy so that a caller can catch a family
(``NotFound``, ``Conflict``) or one case (``DiskNotFound``, ``Busy``).
"""


class ImgconvError(Exception):
    """Base class of every error the client raises."""

    # : The API's error type (``components/schemas/ErrorType``), or None for
    # client-side errors.
    type = None

    def __init__(self, message, code=None):
        super().__init__(message)
        self.message = message
        #: The HTTP status, when the agent answered.
        self.code = code

    def __str__(self):
        if self.code is None:
            return self.message
        return '%s (HTTP %d, %s)' % (self.message, self.code, self.type)


# Client-side errors: the agent did not answer as the API says it does.

class AgentUnavailable(ImgconvError):
    """The socket does not exist, refuses connections or closed the connection
    without an answer.
    """


class Timeout(ImgconvError):
    """A call, or a wait for a fetch or a disk, ran out of time."""


class ProtocolError(ImgconvError):
    """The answer is not what the API documents (not HTTP, not JSON, an
    undocumented error type).
    """


class FetchFailed(ImgconvError):
    """A fetch the agent accepted ended in the ``error`` state; the message is
    the image's ``error``.
    """


# Errors the API documents (components/schemas/ErrorType).

class InvalidRequest(ImgconvError):
    """A path, query or body field is malformed or out of range; the message
    names it.
    """
    type = 'invalid_request'


class BodyTooLarge(InvalidRequest):
    type = 'body_too_large'


class Forbidden(ImgconvError):
    """This process's uid (or groups) may not use the agent's socket."""
    type = 'forbidden'


class TooManyConnections(ImgconvError):
    """This uid has ``[agent] max_connections_per_uid`` connections open."""
    type = 'too_many_connections'


class NotFound(ImgconvError):
    type = 'not_found'


class ImageNotCached(NotFound):
    type = 'image_not_cached'


class ImageNotFound(NotFound):
    """Glance has no such image, or the agent's user may not see it."""
    type = 'image_not_found'


class DiskNotFound(NotFound):
    type = 'disk_not_found'


class Conflict(ImgconvError):
    pass


class Busy(Conflict):
    """Pinned, in use, being fetched or being built."""
    type = 'busy'


class DiskExists(Conflict):
    type = 'disk_exists'


class ImageNotActive(Conflict):
    type = 'image_not_active'


class UnsafeImage(ImgconvError):
    """The image failed inspection (backing file, data file, host-path extent,
    not the declared format).
    """
    type = 'unsafe_image'


class UnsupportedFormat(ImgconvError):
    type = 'unsupported_format'


class NoRoom(ImgconvError):
    """The cache cannot make room under ``max_size`` / ``min_free``."""
    type = 'no_room'


class UpstreamError(ImgconvError):
    """Glance or Keystone failed."""
    type = 'upstream_error'


class BackendUnavailable(ImgconvError):
    """Ceph is unreachable, or a shared base could not be built in time."""
    type = 'backend_unavailable'


class AgentStopping(ImgconvError):
    type = 'agent_stopping'


class InternalError(ImgconvError):
    type = 'internal_error'


#: The API's error type -> the class the client raises.
BY_TYPE = {
    cls.type: cls for cls in (
        InvalidRequest,
        BodyTooLarge,
        Forbidden,
        TooManyConnections,
        NotFound,
        ImageNotCached,
        ImageNotFound,
        DiskNotFound,
        Busy,
        DiskExists,
        ImageNotActive,
        UnsafeImage,
        UnsupportedFormat,
        NoRoom,
        UpstreamError,
        BackendUnavailable,
        AgentStopping,
        InternalError)}
