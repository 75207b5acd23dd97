"""Prefetch into Nova's _base with no patch at all: the agent's [cache] is
Nova's image cache directory (layout = nova: files named sha1(image id);
force_raw = true: raw, as force_raw_images makes them). Nova's unmodified Qcow2
and Flat backends (images_type = qcow2 / flat: the patch changes nothing there)
find the agent's files and never download; Nova's own ImageCacheManager deletes
an unused base behind the agent's back, and the agent notices: the image goes
to `missing`, and a pinned one is fetched again.
"""

import os
import shutil
import subprocess
import tempfile
import time
import unittest
from unittest import mock

import nova_support
from nova_support import fixtures

from nova import objects
from nova.virt.libvirt import imagecache
from nova.virt.libvirt import utils as libvirt_utils

from imgconv_client import Client

CONF = nova_support.CONF


def setUpModule():
    if not fixtures.OPENSTACK:
        raise unittest.SkipTest('needs the Glance fixture')
    nova_support.setup_nova()


class BasePrefetchTest(nova_support.AgentTestCase):

    @classmethod
    def setUpClass(cls):
        cls.instances = tempfile.mkdtemp(prefix='imgconv-nova-base-')
        cls.base_dir = os.path.join(cls.instances, '_base')
        cls.agent = fixtures.Agent(
            sections={
                'cache': {
                    'directory': cls.base_dir,
                    'layout': 'nova',
                    'force_raw': 'true',
                    'check_interval': '1s'}}).start()
        cls.client = Client(cls.agent.socket, timeout=60)
        cls.images = []

    def setUp(self):
        nova_support.configure(self, self.instances)
        self.context = nova_support.context()

    def qcow2_image(self, seed):
        """A qcow2 image in Glance (made by qemu-img, the test oracle) and its
        raw content.
        """
        raw = fixtures.test_bytes((3 << 20) + 4096, seed=seed)
        work = tempfile.mkdtemp(prefix='imgconv-nova-img-')
        try:
            with open(os.path.join(work, 'x.raw'), 'wb') as f:
                f.write(raw)
            subprocess.run(['qemu-img',
                            'convert',
                            '-f',
                            'raw',
                            '-O',
                            'qcow2',
                            os.path.join(work,
                                         'x.raw'),
                            os.path.join(work,
                                         'x.qcow2')],
                           check=True)
            with open(os.path.join(work, 'x.qcow2'), 'rb') as f:
                image_id = fixtures.create_image(
                    f.read(), disk_format='qcow2', name='imgconv-nova-base')
        finally:
            shutil.rmtree(work)
        self.images.append(image_id)
        return image_id, raw

    def boot(self, images_type, image_id):
        CONF.set_override('images_type', images_type, group='libvirt')
        inst = nova_support.instance(image_id)
        _, fetches = nova_support.create_root_disk(
            nova_support.driver(), self.context, inst, image_id)
        return inst, fetches

    def test_qcow2_and_flat_backends_find_the_agents_files(self):
        image_id, raw = self.qcow2_image(seed=41)
        cached = self.client.fetch(image_id, timeout=120)
        base = os.path.join(self.base_dir,
                            imagecache.get_cache_fname(image_id))
        self.assertEqual(cached['path'], base)
        self.assertEqual(cached['stored_format'], 'raw')
        with open(base, 'rb') as f:
            self.assertEqual(f.read(), raw)

        inst, fetches = self.boot('qcow2', image_id)
        self.assertEqual(
            fetches, 0, "Nova's Qcow2 backend downloaded the image")
        disk = os.path.join(libvirt_utils.get_instance_path(inst), 'disk')
        info = nova_support.qemu_img_info(disk)
        # the overlay's backing file is the agent's file
        self.assertIn(base, info)
        self.assertEqual(nova_support.raw_of(disk)[:len(raw)], raw)

        inst, fetches = self.boot('flat', image_id)
        self.assertEqual(
            fetches, 0, "Nova's Flat backend downloaded the image")
        disk = os.path.join(libvirt_utils.get_instance_path(inst), 'disk')
        with open(disk, 'rb') as f:
            self.assertEqual(f.read(len(raw)), raw)

    def test_the_image_cache_manager_deletes_a_base_and_the_agent_notices(
            self):
        pinned, pinned_raw = self.qcow2_image(seed=42)
        plain, _ = self.qcow2_image(seed=43)
        for image_id in (pinned, plain):
            self.client.fetch(image_id, timeout=120)
        self.client.pin(pinned)
        paths = {
            i: os.path.join(
                self.base_dir,
                imagecache.get_cache_fname(i)) for i in (
                pinned,
                plain)}
        old = time.time() - 7200
        for p in paths.values():
            os.utime(p, (old, old))

        # Nova's own manager, with no instance on the node: both bases are
        # unused and old enough.
        CONF.set_override('images_type', 'qcow2', group='libvirt')
        CONF.set_override(
            'remove_unused_original_minimum_age_seconds',
            3600,
            group='image_cache')
        manager = imagecache.ImageCacheManager()
        # The one database call of update(): the block devices of the node's
        # instances (there are none).
        with mock.patch.object(objects.BlockDeviceMappingList,
                               'bdms_by_instance_uuid', return_value={}):
            manager.update(self.context, [])
        self.assertFalse(any(os.path.exists(p)
                         for p in paths.values()), 'Nova removed nothing')

        # The agent's check (check_interval = 1s): the plain image is missing,
        # the pinned one fetched again.
        deadline = time.time() + 60
        while time.time() < deadline:
            states = {i: self.client.image(i)['state']
                      for i in (pinned, plain)}
            if (states[plain] == 'missing' and states[pinned] == 'ready' and
                    os.path.exists(paths[pinned])):
                break
            time.sleep(0.2)
        self.assertEqual(states, {pinned: 'ready', plain: 'missing'})
        with open(paths[pinned], 'rb') as f:
            self.assertEqual(f.read(), pinned_raw)
        # Asked for again, the missing one is fetched again.
        self.assertEqual(
            self.client.fetch(
                plain,
                timeout=120)['state'],
            'ready')
        self.assertTrue(os.path.exists(paths[plain]))


if __name__ == '__main__':
    unittest.main()
