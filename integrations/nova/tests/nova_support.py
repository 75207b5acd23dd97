"""What Nova's image backend needs outside nova-compute, shared by the Nova
tests: the config parsed with no files, objects.register_all(), privsep run
in-process (as root), oslo.concurrency's lock_path, a request context with a
Keystone token, an instance object, and the driver's root-disk path with Nova's
own download function spied on.
"""

import os
import shutil
import subprocess
import sys
import unittest
import uuid
from unittest import mock

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(
    0,
    os.path.join(
        HERE,
        '..',
        '..',
        '..',
        'clients',
        'python',
        'tests'))

# The client tests' fixtures: the agent, Glance, Ceph.
import fixtures  # noqa: E402

import nova.conf  # noqa: E402
from nova import context as nova_context  # noqa: E402
from nova import objects  # noqa: E402
import nova.privsep  # noqa: E402
from nova.virt.libvirt import driver as libvirt_driver  # noqa: E402
from nova.virt.libvirt import imagebackend  # noqa: E402
from nova.virt.libvirt import utils as libvirt_utils  # noqa: E402

CONF = nova.conf.CONF
DISK_MAPPING = {'disk': {'bus': 'virtio', 'dev': 'vda', 'type': 'disk'}}
_ready = []


def setup_nova():
    """Once per process."""
    if _ready:
        return
    CONF([], project='nova', default_config_files=[])
    objects.register_all()
    nova.privsep.sys_admin_pctxt.set_client_mode(False)
    _ready.append(True)


def configure(test, instances, **groups):
    """instances_path, lock_path and Glance, plus `groups` ({group: {key:
    value}}); reset after the test.
    """
    values = {
        None: {
            'instances_path': instances}, 'oslo_concurrency': {
            'lock_path': os.path.join(
                instances, 'locks')}, 'glance': {
                    'api_servers': [
                        fixtures.OPENSTACK['GLANCE_URL']]}}
    values.update(groups)
    for group, kv in values.items():
        for k, v in kv.items():
            CONF.set_override(k, v, group=group)
    test.addCleanup(CONF.reset)


def context():
    return nova_context.RequestContext(
        user_id='admin',
        project_id='admin',
        is_admin=True,
        auth_token=fixtures.token())


def instance(image_id, root_gb=1):
    """An instance object as the driver gets it, with its directory made first,
    as the driver does.
    """
    inst = objects.Instance(
        id=1,
        uuid=str(
            uuid.uuid4()),
        project_id='admin',
        user_id='admin',
        image_ref=image_id,
        flavor=objects.Flavor(
            root_gb=root_gb,
            ephemeral_gb=0,
            swap=0,
            memory_mb=512,
            vcpus=1,
            extra_specs={}),
        system_metadata={},
        config_drive='',
        task_state=None,
        vm_state='building',
        trusted_certs=None,
        migration_context=None,
        cleaned=False,
        metadata={})
    os.makedirs(libvirt_utils.get_instance_path(inst), exist_ok=True)
    return inst


def driver():
    """A LibvirtDriver with only its image backend (no libvirt connection)."""
    drv = libvirt_driver.LibvirtDriver.__new__(libvirt_driver.LibvirtDriver)
    drv.image_backend = imagebackend.Backend(CONF.use_cow_images)
    return drv


def create_root_disk(drv, ctx, inst, image_id):
    """The driver's own root-disk path (_create_and_inject_local_root, as spawn
    calls it) with Nova's download function (libvirt_utils.fetch_image) spied
    on: (created, how often Nova fetched).
    """
    disk_images = {'image_id': image_id, 'kernel_id': None, 'ramdisk_id': None}
    with mock.patch.object(libvirt_utils, 'fetch_image',
                           wraps=libvirt_utils.fetch_image) as fetch:
        created = drv._create_and_inject_local_root(
            ctx, inst, DISK_MAPPING, False, '', disk_images, None, None)
    return created, fetch.call_count


def qemu_img_info(path):
    """`qemu-img info --output=json` of a disk (the test oracle), as text."""
    return subprocess.run(['qemu-img', 'info', '--output=json', path],
                          check=True, capture_output=True, text=True).stdout


def raw_of(path):
    """A disk's content as raw bytes, converted by qemu-img (the oracle)."""
    out = path + '.check.raw'
    subprocess.run(['qemu-img', 'convert', '-O', 'raw', path, out],
                   check=True)
    try:
        with open(out, 'rb') as f:
            return f.read()
    finally:
        os.unlink(out)


class AgentTestCase(unittest.TestCase):
    """A test class with one agent (cls.agent), an instances directory
    (cls.instances) and the Glance images its tests make (cls.images), all
    removed after the class."""

    agent = None
    instances = None
    images = []

    @classmethod
    def tearDownClass(cls):
        if cls.agent is not None:
            cls.agent.close()
        shutil.rmtree(cls.instances, ignore_errors=True)
        for image_id in cls.images:
            fixtures.delete_image(image_id)
