"""Nova image backends whose root disks the imgconv agent makes (``[libvirt]
images_type = imgconv``).

With ``[imgconv] disk_type = rbd`` (Ceph) the root disk is the agent's
``<images_rbd_pool>/<uuid>_disk``, a copy-on-write clone of Glance's own
snapshot, of Glance's copy in a local rbd store, or of a base the agent built
once per image. ``ImgconvRbd`` is Nova's ``Rbd`` backend in every other
respect, so libvirt gets the same network disk and snapshot, resize, rescue and
delete go through Nova's rbd code. With ``disk_type = qcow2`` the agent makes
the qcow2 overlay ``<instances_path>/<uuid>/disk`` on its raw base, and
``ImgconvQcow2`` is Nova's ``Qcow2`` backend otherwise.

Only the root disk (``disk``) of an instance is the agent's; rescue, ephemeral,
swap and config drive disks are made by Nova as usual. When the agent is not
answering (or cannot make the disk), ``[imgconv] fallback`` decides: ``fail``
raises ``AgentUnavailable``, ``nova`` lets Nova make the disk its own way.
"""

from oslo_log import log as logging

import nova.conf
from nova import exception
from nova.virt.libvirt import imagebackend

from imgconv_client import Client, errors

CONF = nova.conf.CONF
LOG = logging.getLogger(__name__)

# Errors that say the agent could not be asked, or could not answer: what
# [imgconv] fallback is for.
_UNAVAILABLE = (errors.AgentUnavailable, errors.Timeout, errors.AgentStopping,
                errors.TooManyConnections, errors.Forbidden,
                errors.ProtocolError, errors.UpstreamError,
                errors.BackendUnavailable, errors.NoRoom,
                errors.InternalError, errors.Busy)


class AgentUnavailable(exception.NovaException):
    msg_fmt = ('The imgconv agent on %(socket)s did not make %(disk)s for '
               'image %(image_id)s: %(reason)s. Start the agent (systemctl '
               'status imgconv-agent), or set [imgconv] fallback = nova to '
               'let Nova make disks while it is down.')


class DiskRefused(exception.NovaException):
    msg_fmt = ('The imgconv agent refused image %(image_id)s for %(disk)s: '
               '%(reason)s')


def effective_images_type(conf=CONF):
    """[libvirt] images_type as the rest of the libvirt driver must see it.

    ``rbd`` or ``qcow2`` for ``imgconv``, the configured value otherwise.
    """
    if conf.libvirt.images_type != 'imgconv':
        return conf.libvirt.images_type
    return conf.imgconv.disk_type


def backend_class(conf=CONF):
    return ImgconvRbd if conf.imgconv.disk_type == 'rbd' else ImgconvQcow2


def client():
    return Client(CONF.imgconv.socket_path, timeout=30)


def cache_image(context, image_id):
    """The libvirt driver's cache_image: the agent fetches the image.

    Nova's aggregate image pre-cache API calls it on each node. Returns True
    when the image was fetched now, False when it was already cached.
    """
    agent = client()
    try:
        first = agent.fetch(image_id, wait=False)
        if first.get('state') == 'ready':
            return False
        agent.fetch(image_id, wait=True, timeout=CONF.imgconv.timeout)
        return True
    except errors.ImageNotFound:
        raise exception.ImageNotFound(image_id=image_id)
    except errors.ImgconvError as e:
        raise AgentUnavailable(socket=CONF.imgconv.socket_path,
                               disk='the image cache', image_id=image_id,
                               reason=str(e))


class _AgentDisk(object):
    """What both backends share: asking the agent for the root disk."""

    def _agent_setup(self, instance, disk_name):
        # Only an instance's root disk is the agent's: <uuid>_disk (rbd) or
        # <uuid>/disk (qcow2).
        self._agent_instance = None
        if instance is not None and disk_name == 'disk':
            self._agent_instance = instance.uuid
        self._agent_size = None

    def _agent_make(self, image_id, size):
        """Asks the agent for the disk.

        True when the agent made it (or it exists), False when Nova should
        make it its own way (``fallback = nova``); raises otherwise.
        """
        disk = '%s_disk' % self._agent_instance
        try:
            made = client().disk_create(self._agent_instance, image_id,
                                        size=size,
                                        timeout=CONF.imgconv.timeout)
        except errors.DiskExists:
            return True
        except errors.ImageNotFound:
            raise exception.ImageNotFound(image_id=image_id)
        except (errors.UnsafeImage, errors.UnsupportedFormat,
                errors.InvalidRequest, errors.ImageNotActive) as e:
            raise DiskRefused(image_id=image_id, disk=disk, reason=e.message)
        except _UNAVAILABLE as e:
            if CONF.imgconv.fallback == 'nova':
                LOG.warning('The imgconv agent did not make %(disk)s '
                            '(%(error)s); Nova makes it ([imgconv] '
                            'fallback = nova)', {'disk': disk, 'error': e})
                return False
            raise AgentUnavailable(socket=CONF.imgconv.socket_path,
                                   disk=disk, image_id=image_id,
                                   reason=str(e))
        LOG.info('imgconv made %(disk)s from image %(image)s: %(method)s '
                 'in %(seconds).3f s',
                 {'disk': made.get('location', disk), 'image': image_id,
                  'method': made.get('method'),
                  'seconds': made.get('seconds', 0.0)})
        return True


class ImgconvRbd(_AgentDisk, imagebackend.Rbd):
    """Nova's Rbd backend, whose root disk the agent clones."""

    def __init__(self, instance=None, disk_name=None, path=None,
                 disk_info_mapping=None):
        super().__init__(instance=instance, disk_name=disk_name, path=path,
                         disk_info_mapping=disk_info_mapping)
        self._agent_setup(instance, disk_name)

    def create_image(self, prepare_template, base, size, *args, **kwargs):
        # The flavor's size goes to the agent, which makes the disk that size
        # in one step.
        self._agent_size = size
        return super().create_image(prepare_template, base, size,
                                    *args, **kwargs)

    def clone(self, context, image_id_or_uri, copy_to_store=True):
        # The libvirt driver calls clone() first for a backend that supports
        # it, and downloads only on ImageUnacceptable: the agent's disk is
        # that clone.
        if (self._agent_instance is not None and
                self._agent_make(image_id_or_uri, self._agent_size)):
            return
        return super().clone(context, image_id_or_uri,
                             copy_to_store=copy_to_store)


class ImgconvQcow2(_AgentDisk, imagebackend.Qcow2):
    """Nova's Qcow2 backend, whose root disk overlay the agent makes."""

    def __init__(self, instance=None, disk_name=None, path=None,
                 disk_info_mapping=None):
        super().__init__(instance=instance, disk_name=disk_name, path=path,
                         disk_info_mapping=disk_info_mapping)
        self._agent_setup(instance, disk_name)

    def create_image(self, prepare_template, base, size, *args, **kwargs):
        image_id = kwargs.get('image_id')
        if (self._agent_instance is not None and image_id and
                not self.exists() and self._agent_make(image_id, size)):
            return
        return super().create_image(prepare_template, base, size,
                                    *args, **kwargs)
